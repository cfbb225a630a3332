# The nufilt daemon, built by compose.yaml with the repository root as context:
#   docker build -f deploy/nufilt.Dockerfile -t nufilt:local .
# torch: PyPI's Linux wheel is the CUDA build (GPU hosts, large). A CPU-only image:
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# the service user; its home holds the inbox, store and state (a volume in compose.yaml)
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/nufilt nufilt

RUN python -m venv /opt/nufilt/.venv \
 && /opt/nufilt/.venv/bin/pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

WORKDIR /opt/nufilt/src
COPY pyproject.toml README.md ./
COPY nufilt_core ./nufilt_core
COPY daemon ./daemon
RUN /opt/nufilt/.venv/bin/pip install . && rm -rf build

ENV PATH=/opt/nufilt/.venv/bin:$PATH
USER nufilt
WORKDIR /var/lib/nufilt
VOLUME /var/lib/nufilt
EXPOSE 9180
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('NUFILT_METRICS_PORT', '9180'), timeout=5)"
ENTRYPOINT ["nufilt"]
CMD ["daemon"]
