"""--host_memory_reuse: glibc keeps freed host tensors mapped (measured in page faults), and auto decides
from the device and the user's own allocator settings."""

import json
import subprocess
import sys

import pytest

from fcd_ds.errors import UsageError
from fcd_ds.runtime.host_memory import allocator_in_environment, glibc, resolve_host_memory_reuse

# Allocates, fills and frees a 64 MiB tensor 30 times and prints the minor page faults of each round.
# Run in its own process: mallopt is per process.
FAULTS = """
import json, resource, sys
import torch
from fcd_ds.runtime.host_memory import reuse_freed_host_memory
if sys.argv[1] == "on":
    reuse_freed_host_memory()
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 2**20 // 4)  # 64 MiB: above glibc's default mmap threshold (32 MiB at most)
    x.fill_(1.0)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_glibc_is_found_here():
    assert glibc() is not None  # the CI machine is Linux with glibc: every other test here relies on it


def test_reused_host_memory_is_not_faulted_in_again():
    off, on = _faults("off"), _faults("on")
    # glibc's default: each 64 MiB block is a fresh mmap, touched page by page every round
    assert min(off[-10:]) > 0
    # reused: once the heap has a free block that large (the small allocations of each round split the first
    # ones: 8 rounds here), the rounds find it mapped; the last 10 rounds fault at most 5% of the default's
    assert sum(on[-10:]) * 20 <= sum(off[-10:]), (off, on)


@pytest.mark.parametrize("setting, device, env, expected", [
    ("auto", "cpu", {}, True),
    ("auto", "cuda", {}, False),
    ("auto", "cpu", {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, False),
    ("auto", "cpu", {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, False),
    ("auto", "cpu", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, False),
    ("auto", "cpu", {"MALLOC_MMAP_THRESHOLD_": "131072"}, False),
    ("auto", "cpu", {"LD_PRELOAD": "/opt/libfoo.so", "GLIBC_TUNABLES": "glibc.rtld.nns=2"}, True),  # neither sets malloc
    ("true", "cuda", {"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ("false", "cpu", {}, False),
])
def test_auto_follows_the_device_and_leaves_user_allocator_settings_alone(setting, device, env, expected):
    on, why = resolve_host_memory_reuse(setting, device, env)
    assert on is expected
    assert why.startswith("on (" if expected else "off (")
    user = allocator_in_environment(env)
    if setting == "auto" and device == "cpu" and user is not None:
        assert user.split("=")[0] in why  # the log names the setting it deferred to


def test_unknown_setting_names_the_flag():
    with pytest.raises(UsageError, match=r"^--host_memory_reuse: must be one of \('auto', 'true', 'false'\), got 'yes'$"):
        resolve_host_memory_reuse("yes", "cpu", {})


class _RefusingGlibc:
    """A glibc whose mallopt refuses every value (as releases that capped the mmap threshold at 32 MiB did)."""

    @staticmethod
    def mallopt(option, value):
        return 0


def test_a_refusing_glibc_leaves_auto_off_and_fails_true(monkeypatch):
    from fcd_ds.runtime import host_memory

    monkeypatch.setattr(host_memory, "glibc", lambda: _RefusingGlibc())
    why = host_memory.apply_host_memory_reuse("auto", "cpu", {})
    assert why.startswith("off (auto: glibc's mallopt refused option -3")
    with pytest.raises(UsageError, match=r"^--host_memory_reuse true: glibc's mallopt refused option -3 = 1073741824; pass auto or false$"):
        host_memory.apply_host_memory_reuse("true", "cpu", {})
    assert host_memory.apply_host_memory_reuse("false", "cpu", {}) == "off (--host_memory_reuse false)"
