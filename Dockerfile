# The fedmobillm training server (ingest + trainer), SQLite under /var/lib/fedmobillm
# (or PostgreSQL with --database, see compose.yaml).
#   docker build -t fedmobillm-server .
#   docker run -e FEDMOBILLM_ADMIN_TOKEN=... -p 8000:8000 -v fedmobillm:/var/lib/fedmobillm fedmobillm-server
# See docs/deploy.md. Versions are the ones the project is tested with (constraints.txt).
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

WORKDIR /opt/fedmobillm
COPY constraints.txt pyproject.toml README.md ./
# torch first, pinned (pass --build-arg PIP_INDEX_URL=... for a CPU-only torch index)
ARG PIP_INDEX_URL
RUN pip install "torch==2.13.*" -c constraints.txt
COPY src ./src
COPY export ./export
COPY device_runtime ./device_runtime
COPY server ./server
COPY android_bridge ./android_bridge
RUN pip install ".[server,postgres]" -c constraints.txt

RUN useradd --system --home /var/lib/fedmobillm fedmobillm \
    && mkdir -p /var/lib/fedmobillm /etc/fedmobillm \
    && chown fedmobillm /var/lib/fedmobillm
COPY docs/deploy/server.toml /etc/fedmobillm/server.toml
USER fedmobillm
VOLUME /var/lib/fedmobillm
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
# SIGTERM: the trainer checkpoints and exports before exit (allow it time: stop_grace_period)
STOPSIGNAL SIGTERM
CMD ["fedmobillm", "serve", "--config", "/etc/fedmobillm/server.toml"]
