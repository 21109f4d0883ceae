# MLflow tracking server with the Postgres driver and S3 (MinIO) client it needs.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow>=3.1,<4" psycopg2-binary boto3
EXPOSE 5000
