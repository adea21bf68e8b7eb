"""Code a memory-test driver runs first: cap its own address space at what it uses now
(after its imports) plus ``int(sys.argv[2])`` bytes, so an input that allocates past that
fails with MemoryError in the driver instead of taking the test machine down."""

CAP_ADDRESS_SPACE = """\
import resource as _resource, sys as _sys
with open("/proc/self/status") as _f:
    _vm = next(int(l.split()[1]) * 1024 for l in _f if l.startswith("VmSize:"))
_soft, _hard = _resource.getrlimit(_resource.RLIMIT_AS)
_cap = _vm + int(_sys.argv[2])
_resource.setrlimit(_resource.RLIMIT_AS, (_cap if _hard == _resource.RLIM_INFINITY else min(_cap, _hard), _hard))
"""


def with_cap(driver: str) -> str:
    """``driver`` (dedented source) with its ``# CAP ADDRESS SPACE`` line replaced by the cap."""
    marker = "# CAP ADDRESS SPACE\n"
    assert marker in driver, "the driver has no '# CAP ADDRESS SPACE' line"
    return driver.replace(marker, CAP_ADDRESS_SPACE)
