# syntax=docker/dockerfile:1
# The API: slim Python, no ML stack. `charter serve --no-worker` runs the job store's
# migrations, then serves the API; workers run elsewhere (worker-gpu / worker-cpu images).
#   docker build -f docker/api.Dockerfile -t charter-api .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install --no-cache-dir -r /tmp/requirements-api.txt

COPY pyproject.toml README.md LICENSE ./
COPY charter ./charter
# --no-deps: the project's declared dependencies are the ML stack, which this image leaves out.
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 charter \
    && mkdir -p /data \
    && chown charter /data

USER 10001
ENV CHARTER_HOME=/data \
    CHARTER_HOST=0.0.0.0 \
    CHARTER_PORT=8400
EXPOSE 8400
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8400/healthz', timeout=3)"]
CMD ["charter", "serve", "--no-worker"]
