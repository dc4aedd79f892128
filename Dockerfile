# One image for the API and the worker; the command chooses which (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 OMP_WAIT_POLICY=PASSIVE \
    TUNESERVE_DATA_DIR=/data TUNESERVE_HOST=0.0.0.0
# A CUDA build for GPU workers; override with --build-arg TORCH="torch==2.13.0 --index-url ..." as needed.
ARG TORCH="torch==2.13.0"

WORKDIR /app
RUN pip install $TORCH
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install .

VOLUME /data
EXPOSE 8000
CMD ["tuneserve", "serve"]
