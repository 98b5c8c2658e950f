# syntax=docker/dockerfile:1
#
# heinfer service image: `heinfer serve` as a non-root user on python:3.11-slim.
#
#   docker build -t heinfer:0.1.0 .
#   docker build -t heinfer-ray:0.1.0 --build-arg EXTRAS=azure,s3,ray .   # for KubeRay
#   docker run --rm -p 8000:8000 --shm-size=512m \
#     -v "$PWD/mnist.heinfer:/models/model.heinfer:ro" \
#     -v "$PWD/tokens:/etc/heinfer/auth/tokens:ro" heinfer:0.1.0
#
# Two stages: the build stage turns heinfer and every dependency into wheels; the runtime stage
# installs only those wheels, offline, so no build tool reaches the runtime image. All
# dependencies ship manylinux wheels for x86_64 and aarch64 (TenSEAL included); heinfer's own
# wheel compiles its two small C extensions (setup.py), so only the build stage gets gcc.
#
# Runtime notes: SEAL writes scratch files to /dev/shm (give the container --shm-size, or in
# Kubernetes an emptyDir with medium: Memory), the root filesystem can be read-only (only /tmp
# and /dev/shm are written; keys go to the key store), and the default command expects a model
# at /models/model.heinfer and tenant tokens (`heinfer token new`) at /etc/heinfer/auth/tokens.
# Pass your own arguments after the image name to change any of that (see docs/deploy.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=azure,s3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN python -m pip wheel --wheel-dir /wheels ".[${EXTRAS}]"

FROM ${PYTHON_IMAGE} AS runtime
ARG EXTRAS=azure,s3
LABEL org.opencontainers.image.title="heinfer" \
      org.opencontainers.image.description="Encrypted inference web service (Microsoft SEAL)" \
      org.opencontainers.image.licenses="MIT"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/heinfer \
    XDG_CACHE_HOME=/tmp/.cache
# KubeRay's default pod probes call wget; only the Ray image gets it.
RUN case ",${EXTRAS}," in \
        *,ray,*) apt-get update \
            && apt-get install -y --no-install-recommends wget \
            && rm -rf /var/lib/apt/lists/* ;; \
    esac \
    && groupadd --system --gid 10001 heinfer \
    && useradd --system --uid 10001 --gid heinfer --home-dir /home/heinfer --create-home \
        --shell /usr/sbin/nologin heinfer \
    && mkdir -p /models /etc/heinfer/auth /var/lib/heinfer/keys \
    && chown heinfer:heinfer /var/lib/heinfer/keys
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links /wheels "heinfer[${EXTRAS}]"

USER 10001:10001
WORKDIR /home/heinfer
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4)"]
ENTRYPOINT ["heinfer", "serve"]
CMD ["/models/model.heinfer", "--host", "0.0.0.0", "--port", "8000", \
     "--auth-file", "/etc/heinfer/auth/tokens", "--key-store", "/var/lib/heinfer/keys"]
