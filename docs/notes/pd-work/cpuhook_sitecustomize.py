"""Experiment only (issue 36 research): on the CPU engine, make upstream's Mooncake sender take
the numpy page-index path in `_send_kv_chunk` (prefill.py:1762) instead of the pinned-memory +
torch.cuda.Event path (prefill.py:1754-1761), by setting the class attribute
`MooncakeKVSender.supports_host_tensor_indices = False` right after the module is imported."""

import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "sglang.srt.disaggregation.mooncake.conn"


class _After(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET or os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            module.MooncakeKVSender.supports_host_tensor_indices = False
            print(
                "[pd-research cpuhook] MooncakeKVSender.supports_host_tensor_indices = False",
                file=sys.stderr,
                flush=True,
            )

        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _After())
