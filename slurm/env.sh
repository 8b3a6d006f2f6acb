# Sourced by every slurm/submit_* script: sets PYTHON to the interpreter of the environment that
# holds adaptlab, and puts that environment's bin folder first on PATH (as activating it would,
# so that tools it installs, such as ninja for DeepSpeed's builds, are found).
#
# Where the environment is looked for, first match wins:
#   1. $ADAPTLAB_PYTHON, if set: that interpreter, no questions asked;
#   2. the activated venv ($VIRTUAL_ENV/bin/python), then the activated conda env
#      ($CONDA_PREFIX/bin/python); the venv first, since one is often activated on top of a
#      conda base env;
#   3. the project's own .venv/bin/python (what `make` creates).
# An activated env without adaptlab installed is passed over (a conda base env that the login
# shell activates is the usual case), and the job log says so. sbatch exports the submitting
# shell's environment to the job, so activate the env (or set ADAPTLAB_PYTHON) before sbatch.

_adaptlab_root=$(CDPATH="" cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)

_adaptlab_has_package() {
    "$1" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("adaptlab") is None)' \
        2>/dev/null
}

_adaptlab_find_python() {
    local candidate origin passed=""
    if [ -n "${ADAPTLAB_PYTHON:-}" ]; then
        if [ ! -x "$ADAPTLAB_PYTHON" ]; then
            echo "error: ADAPTLAB_PYTHON=$ADAPTLAB_PYTHON is not an executable file; point it" \
                "at the python of the environment that holds adaptlab." >&2
            return 2
        fi
        PYTHON=$ADAPTLAB_PYTHON
        echo "adaptlab: using $PYTHON (ADAPTLAB_PYTHON)"
        return 0
    fi
    for origin in "VIRTUAL_ENV" "CONDA_PREFIX" ".venv"; do
        if [ "$origin" = ".venv" ]; then
            candidate=$_adaptlab_root/.venv/bin/python
        elif [ -n "${!origin:-}" ]; then
            candidate=${!origin}/bin/python
        else
            continue
        fi
        if [ ! -x "$candidate" ]; then
            [ "$origin" = ".venv" ] || passed="${passed:+$passed; }$candidate ($origin: no python)"
            continue
        fi
        if ! _adaptlab_has_package "$candidate"; then
            passed="${passed:+$passed; }$candidate ($origin: no adaptlab)"
            continue
        fi
        PYTHON=$candidate
        echo "adaptlab: using $PYTHON ($origin)${passed:+; passed over: $passed}"
        return 0
    done
    echo "error: no python environment with adaptlab found${passed:+ (passed over: $passed)};" \
        "activate one before sbatch, set ADAPTLAB_PYTHON=/path/to/env/bin/python, or run make" \
        "in $_adaptlab_root to create .venv." >&2
    return 2
}

_adaptlab_find_python || exit $?
PATH=$(dirname "$PYTHON"):$PATH
export PATH
