# Sourced at the start of a device command: `. tools/device_setup.sh && python benchmarks/...` (bash).
# Gathers the call's part of .carry (tools/device_carry.py pack) under /tmp/rora-carry, installs its wheels, unpacks
# the data, joins the embedded model once all of it has come, and exports what rora needs to run there offline.
python3 tools/device_carry.py unpack .carry /tmp/rora-carry /tmp/rora-site /tmp/rora-data || return 1
export PYTHONPATH="/tmp/rora-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
if [ -d /tmp/rora-data ]; then export RORA_DATA_DIR=/tmp/rora-data; fi
