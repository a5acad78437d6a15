#!/usr/bin/env bash
# Pack the pure-Python (and cp311 compiled) dependencies that bench/gpu.sh needs beyond torch and
# numpy into build/gpu-deps.tgz (git-ignored, ~25 MB), from this machine's .venv. Use it when the
# GPU machine has torch but not timm / diffusers / zarr / webdataset and cannot reach a registry:
# pass carry ["build/gpu-deps.tgz"] to the device run; gpu.sh then links in only the modules the
# GPU machine's python lacks. Compiled members (numcodecs, google_crc32c, regex, yaml, PIL,
# safetensors) load only under CPython 3.11 with numpy 2.x; gpu.sh reports what still fails.
set -euo pipefail
cd "$(dirname "$0")/.."
SP=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p build
MODS="timm diffusers zarr numcodecs webdataset huggingface_hub safetensors donfig google_crc32c
      google_crc32c.libs braceexpand typing_extensions.py filelock fsspec importlib_metadata regex yaml
      packaging tqdm requests urllib3 idna charset_normalizer certifi PIL pillow.libs zipp"
present=()
for m in $MODS; do [ -e "$SP/$m" ] && present+=("$m"); done
tar --exclude=__pycache__ --exclude='diffusers/pipelines' -czf build/gpu-deps.tgz -C "$SP" "${present[@]}"
ls -la build/gpu-deps.tgz
