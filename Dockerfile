# The engine as a container; docker-compose.yml runs it beside PostgreSQL 16.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine engine
COPY media media
COPY pipelines pipelines
COPY storage storage
COPY config config
RUN pip install . && useradd --system --home-dir /app dialtone
USER dialtone

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"
# Inside the container the engine listens on every interface; docker-compose publishes it on loopback only.
CMD ["dialtone", "serve", "--host", "0.0.0.0", "--port", "8080"]
