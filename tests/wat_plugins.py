"""Small plugin modules written in WebAssembly text (compiled by wasmtime.wat2wasm), for the tests of
what publishing accepts and refuses: one module per way a module can be right or wrong, each a few
lines, so a test names exactly what it breaks. The real plugins (C, Rust) are built by scripts/plugins.sh."""

from __future__ import annotations

import json
from pathlib import Path

import wasmtime

# Imports the ABI allows (docs/plugins.md), left unused: publishing must accept a module that has them.
_IMPORTS = """
  (import "edgefleet" "log" (func $log (param i32 i32 i32)))
  (import "edgefleet" "now_ms" (func $now (result i64)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
"""


def module(abi: str = "i32.const 1", *, memory: str = '(memory (export "memory") 1)',
           on_prediction: str = '(func (export "edgefleet_on_prediction") (param i32 i32) (result i64) i64.const 0)',
           extra: str = "", imports: str = "") -> bytes:
    """A plugin module; each argument replaces one part (an empty string leaves it out); `imports` adds
    import declarations to the ABI's."""
    abi_export = f'(func (export "edgefleet_abi_version") (result i32) {abi})' if abi else ""
    return wasmtime.wat2wasm(f"""(module {_IMPORTS} {imports}
  {memory}
  {abi_export}
  (func (export "edgefleet_alloc") (param i32) (result i32) i32.const 1024)
  {on_prediction}
  {extra})""")


GOOD = module()
# Returns 0 with a different body, so its bytes (and SHA-256) differ from GOOD's.
GOOD_OTHER = module(on_prediction='(func (export "edgefleet_on_prediction") (param i32 i32) (result i64) '
                                  'i64.const 1 i64.const 1 i64.sub)')
WITHOUT_ON_PREDICTION = module(on_prediction="")
WITHOUT_MEMORY = module(memory="(memory 1)")
MISTYPED_ON_PREDICTION = module(
    on_prediction='(func (export "edgefleet_on_prediction") (param i32 i32) (result i32) i32.const 0)')
WRONG_ABI = module("i32.const 2")
LOOPING_ABI = module("(loop $forever (br $forever)) i32.const 1")
# Asking for its ABI version, it logs: the device provides `edgefleet.log` while starting, so it loads.
IMPORT_CALLING_ABI = module("(call $log (i32.const 20) (i32.const 0) (i32.const 0)) i32.const 1")
HUGE_MEMORY = module(memory='(memory (export "memory") 300)')
# An import the host does not provide (a later ABI's, or a typo): every device refuses to link it.
UNKNOWN_IMPORT = module(imports='(import "edgefleet" "foo" (func (param i32)))')
# Its edgefleet_init refuses any config (non-zero): the device refuses the load.
INIT_REFUSING = module(extra='(func (export "edgefleet_init") (param i32 i32) (result i32) i32.const 7)')
# A WASI reactor whose constructors trap: the device runs _initialize first, so it never starts.
INITIALIZE_TRAPPING = module(extra='(func (export "_initialize") unreachable)')
NOT_WASM = b"\x00asm\x01\x00\x00\x00 this is not a module"

SPEC = {
    "name": "door-rule",
    "description": "alerts on people at the door at night",
    "limits": {"memory_pages": 32, "fuel": 2_000_000, "deadline_ms": 20, "result_bytes": 65536, "emits": 2,
               "emit_bytes": 4096, "infer_calls": 0},
    "grants": {"dirs": [], "env": {"SITE": "dock-4"}, "frame": False, "infer": False},
    "config": {"classes": "person", "from_hour": "22", "to_hour": "6"},
}


def write(folder: Path, wasm: bytes = GOOD, stem: str = "plugin", **spec: object) -> tuple[Path, Path]:
    """Writes a module and its spec (SPEC with `spec`'s keys over it) into folder; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    module_path, spec_path = folder / f"{stem}.wasm", folder / f"{stem}.json"
    module_path.write_bytes(wasm)
    spec_path.write_text(json.dumps({**SPEC, **spec}))
    return module_path, spec_path
