# The project image for KubeRay (cluster/kuberay/*.yaml) and any container-based cluster:
# the pinned Ray image + this package (wheel, with the configs and runtime envs shipped as package data).
#
#   docker build --build-arg FLAVOUR=cpu -t $REGISTRY/mplug2-ray:0.1.0-ray2.60.0-py311-cpu .
#   docker build --build-arg FLAVOUR=gpu -t $REGISTRY/mplug2-ray:0.1.0-ray2.60.0-py311-gpu .
#
# The build context is filtered by .dockerignore (no .venv, .s3, outputs, .git). Nothing secret goes into the
# image: pods get S3 access from their service account (IRSA / Workload Identity).
ARG FLAVOUR=cpu

FROM rayproject/ray:2.60.0-py311-${FLAVOUR} AS wheel
WORKDIR /src
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users mplug2 mplug2
COPY --chown=ray:users pipelines pipelines
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users configs configs
RUN python -m pip wheel --no-deps --no-cache-dir -w /tmp/dist .

FROM rayproject/ray:2.60.0-py311-${FLAVOUR}
# torch pinned on the same line: a bare requirement could pull another torch than the one we test with
COPY --from=wheel /tmp/dist/mplug2_ray-0.1.0-py3-none-any.whl /tmp/
RUN python -m pip install --no-cache-dir "torch==2.13.0" /tmp/mplug2_ray-0.1.0-py3-none-any.whl \
    && rm /tmp/mplug2_ray-0.1.0-py3-none-any.whl
# The manifests' working directory. `--config configs/<name>.yaml` resolves here first, then to the copy in the
# installed package (mplug2.paths.config_file); relative run outputs would land here, so the configs use s3://.
WORKDIR /home/ray/mplug2-ray
COPY --chown=ray:users configs configs
COPY --chown=ray:users cluster cluster
