"""Install test: the wheel installs into a fresh venv and all four packages import from it.

The fresh venv sees the project venv's site-packages (torch, TensorFlow,
Horovod) through a path file, but not the editable install of this checkout,
so the imports prove the wheel's own package_dir mapping works.
"""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheel_dir)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("hvd_largebatch-*.whl")

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    fresh_python = env_dir / "bin" / "python"
    fresh_site = subprocess.run(
        [fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # Frameworks come from the project venv; a plain path entry does not run its editable-install hooks.
    Path(fresh_site, "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", fresh_site, str(wheel)],
        check=True,
        cwd=tmp_path,
    )

    probe = (
        "import hvd_largebatch, hvd_largebatch.tf, hvd_largebatch.torch_impl, hvd_largebatch.schedules;"
        "import hvd_largebatch.bench.command, hvd_largebatch.bench.torch_runner, hvd_largebatch.bench.keras_runner;"
        "print(hvd_largebatch.__file__); print(hvd_largebatch.tf.__file__); print(hvd_largebatch.torch_impl.__file__);"
        "print(hvd_largebatch.bench.__file__)"
    )
    out = subprocess.run(
        [fresh_python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout.split()
    assert len(out) == 4
    for path in out:
        assert path.startswith(fresh_site), f"{path} was not imported from the installed wheel"
    assert out[1].endswith("hvd_largebatch/tf/__init__.py")
    assert out[2].endswith("hvd_largebatch/torch_impl/__init__.py")
    assert out[3].endswith("hvd_largebatch/bench/__init__.py")
