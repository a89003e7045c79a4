# The project's image for Ray nodes (cluster/kuberay/*.yaml) and for running `mscnn` anywhere.
#   docker build -t mscnn:latest .
# torch==2.14.1 from PyPI brings its CUDA libraries, so the same image trains on GPU workers.
FROM python:3.11.10-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MSCNN_DATA_DIR=/shared/data
# wget: KubeRay's default health probes; procps: `ray stop`; tini: signals reach `mscnn` (Ctrl-C,
# `ray job stop`) so runs end KILLED instead of hanging RUNNING.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget procps tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 ray

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mscnn mscnn
COPY pipelines pipelines
COPY configs configs
RUN pip install . && mscnn --help >/dev/null

USER ray
ENTRYPOINT ["tini", "--"]
CMD ["mscnn", "--help"]
