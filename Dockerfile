# The engine as a small container image. docker-compose.yml runs three of them behind nginx, beside PostgreSQL
# (with pgvector) and MinIO. Two stages: the first builds the virtual environment (with a compiler, for any
# dependency that has no wheel for this platform); the final image copies only that environment.
FROM python:3.12-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/dialtone
ENV PATH=/opt/dialtone/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY media media
COPY pipelines pipelines
COPY storage storage
COPY config config
RUN pip install .


FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/dialtone/bin:$PATH \
    DIALTONE_STATE_DIR=/var/lib/dialtone

# The engine writes only under its state folder (recordings until uploaded, the signing key when
# DIALTONE_SECRET_KEY is unset, the call-log spill, the recording spool's id). It is made here, owned by the
# non-root user, so a named volume mounted on it starts with that owner too.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/dialtone --no-create-home dialtone \
    && install -d -o dialtone -g dialtone -m 0750 /var/lib/dialtone
COPY --from=build /opt/dialtone /opt/dialtone

USER dialtone
WORKDIR /var/lib/dialtone
VOLUME /var/lib/dialtone

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"]
# SIGTERM drains: new calls are refused (503) while live ones go on for up to DIALTONE_DRAIN_SECONDS (default 20),
# then the rest are ended. Give the container that long and up to 40 s more before SIGKILL: `docker stop` waits only
# 10 s unless run with `--stop-timeout 60`; compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
# Inside the container the engine listens on every interface; only the load balancer is published.
CMD ["dialtone", "serve", "--host", "0.0.0.0", "--port", "8080"]
