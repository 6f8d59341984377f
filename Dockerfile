# radialog-node images. Two targets:
#   app      (default) the Python project: `radialog node | worker | api | db upgrade`; one image for all.
#   orthanc  Debian's Orthanc 1.10 + its Python plugin + our routing script (deploy/orthanc/), the same
#            packages the tests run against.
# Build: docker compose build   (or: docker build --target app -t radialog-node .)
# GPU workers need the NVIDIA container toolkit on the host; torch's PyPI wheel for Linux carries its CUDA
# runtime. For a CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS app

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RADIALOG_DATA_DIR=/var/lib/radialog

# dcmtk and dicom3tools: storescu/echoscu/dsrdump/dciodvfy for operators checking a connection or an SR.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk dicom3tools \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 radialog \
 && useradd --system --uid 10001 --gid radialog --home-dir /var/lib/radialog --create-home radialog

WORKDIR /app
# torch first and alone, so that nothing else picks a different build (as scripts/setup does).
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY radialog ./radialog
COPY dicom_node ./dicom_node
COPY workers ./workers
COPY reporting ./reporting
COPY api ./api
COPY composition ./composition
COPY deploy ./deploy
RUN pip install .

USER radialog
VOLUME ["/var/lib/radialog"]
# 11112: DICOM node, 8000: API
EXPOSE 11112 8000
ENTRYPOINT ["radialog"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS orthanc

RUN apt-get update \
 && apt-get install -y --no-install-recommends orthanc orthanc-python \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/orthanc/db && chown -R orthanc:orthanc /var/lib/orthanc
COPY deploy/orthanc/orthanc.json /etc/orthanc/orthanc.json
COPY deploy/orthanc/radialog_router.py /etc/orthanc/radialog_router.py
# Debian's default configuration files are replaced by ours (one file: deploy/orthanc/orthanc.json).
RUN rm -f /etc/orthanc/credentials.json /etc/orthanc/python.json /etc/orthanc/serve-folders.json \
          /etc/orthanc/worklists.json /etc/orthanc/sample.py
USER orthanc
VOLUME ["/var/lib/orthanc/db"]
EXPOSE 4242 8042
ENTRYPOINT ["/usr/sbin/Orthanc"]
CMD ["/etc/orthanc/orthanc.json"]
