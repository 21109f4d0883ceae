# MLflow tracking server with its basic-auth app, the Postgres driver and the S3 (MinIO) client.
# The version is requirements.lock's, so the server speaks the clients' API (and reads the
# admin account from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary boto3
EXPOSE 5000
