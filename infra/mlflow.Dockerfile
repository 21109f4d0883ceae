# MLflow tracking server with its basic-auth app, the Postgres driver and the S3 (MinIO) client.
# Build from the repository root: docker build -f infra/mlflow.Dockerfile -t segflow-mlflow .
# Every version is requirements.lock's, mlflow's included, so the server speaks the clients'
# API (and reads the admin account from MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD);
# tests/test_images.py checks it.
FROM python:3.11.14-slim-bookworm
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -c /tmp/requirements.lock "mlflow[auth]" psycopg2-binary boto3 \
    && rm /tmp/requirements.lock
EXPOSE 5000
