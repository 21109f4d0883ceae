-- Prefect's database beside MLflow's (POSTGRES_DB creates "mlflow").
CREATE DATABASE prefect;
