# raystages on GPUs: the official Ray image matching the pinned Ray (2.60.0, Python 3.11,
# CUDA), with raystages, vLLM and DeepSpeed installed and the project's code baked in, so
# KubeRay pods and cluster-launcher nodes run `raystages ...` with no working_dir upload.
#
#   docker build -t raystages:0.1.0 .
#   docker run --gpus all --shm-size=8g raystages:0.1.0 raystages pretrain jobs/pretrain.yaml
#
# Versions are pinned to the set tested together (pyproject's `cpu` extra), with the CUDA
# builds of torch and vLLM in place of the CPU ones.
FROM rayproject/ray:2.60.0-py311-gpu

# The Ray image runs as the non-root user `ray` (uid 1000, group `users` 100, home /home/ray)
# with its conda Python on PATH; everything below stays that user, so pods need no root.
USER 1000:100
WORKDIR /home/ray/raystages
ENV HF_HUB_DISABLE_PROGRESS_BARS=1 \
    PIP_NO_CACHE_DIR=1

# Dependencies first (their layer survives code edits): torch/vLLM/DeepSpeed CUDA builds.
RUN pip install --no-cache-dir \
        "torch==2.13.0" \
        "vllm==0.32.0" \
        "deepspeed==0.19.8" \
        "transformers==5.19.0" \
        "tokenizers==0.23.3" \
        "datasets==5.2.0" \
        "peft==0.21.2" \
        "tensorboard==2.21.0" \
        "pydantic==2.14.4" \
        "openai==3.57.0" \
        "matplotlib==3.11.2"

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 raystages ./raystages
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 cluster ./cluster
# Editable install: `raystages` on PATH, and jobs/ beside the package so relative spec paths
# in RayJob entrypoints resolve from this WORKDIR.
RUN pip install --no-cache-dir -e ".[gpu]" \
    && raystages --help > /dev/null

# Runs (checkpoints, lineage, reports) belong on storage every node shares: the cluster
# configs mount it at /data and point run.storage_path at /data/runs.
