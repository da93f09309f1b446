# One image for every party: `docker run IMAGE director start -c ...`, `... envoy start ...`, `... pki ...`.
#   docker build -t fedjax-core .            (or: make image)
# The notebook that submits experiments should run the same Python minor version and the same
# jax/flax versions as this image: the envoys' workers unpickle its code (docs/deploy.md).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedjax_core fedjax_core
COPY fedjax_proto fedjax_proto
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:${PYTHON_VERSION}-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the package and its runtime dependencies only (no test extras)
COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl && rm -rf /tmp/wheels
# a fixed uid, so volumes and certificate files can be owned by it (compose.yaml's pki service chowns to 10001)
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin fedjax \
 && mkdir -p /fedjax/config /fedjax/pki /fedjax/data /fedjax/state /fedjax/work \
 && chown -R fedjax:fedjax /fedjax
USER fedjax
WORKDIR /fedjax
EXPOSE 50055
ENTRYPOINT ["fedjax"]
CMD ["--help"]
