# The environment run_train.sh, run_tests.sh and run_infer.sh run in; sourced by them.
#
# flux_use_env [EXTRA] puts on PATH a `python` (and `torchrun`) that has this checkout's flux, its
# dependencies and EXTRA's (e.g. dev), in this order:
#   1. the `python` already on PATH (an environment the user activated), used as it is;
#   2. .venv at the repository root, when an earlier run set it up completely;
#   3. otherwise it sets up .venv: python -m venv, torch, then `pip install -e .[EXTRA]`.
# The set-up writes .venv/flux-setup last ("complete=1"), so one that was interrupted is
# finished (or rebuilt) by the next run, never used half-made. It says what it does in two lines
# and one at the end; a failure is one line that names the log.
#
# TORCH_SPEC: pip's arguments for torch (default torch==2.13.0, the version CI tests; on a
#   machine without an NVIDIA GPU the CPU build, from TORCH_CPU_INDEX when that answers).
#   Setting it on a later run reinstalls torch in .venv.
# TORCH_CPU_INDEX: where the CPU builds are (default https://download.pytorch.org/whl/cpu).
# FLUX_PYTHON: the Python that creates .venv (default: the first python3, python3.14 ...
#   python3.11 on PATH that is 3.11 or newer).
# Bash 3.2 (macOS) compatible: no mapfile, no {fd} redirections, no empty "${array[@]}".

_FLUX_TORCH_DEFAULT="torch==2.13.0"

# Prints "<ready|missing|other>\t<sys.prefix>\t<what is missing>" for the Python it runs in,
# with argv: the repository root, the extra ("" for none), and "check" or "import" (import:
# also import torch and flux.train, to find files a killed install left out).
_FLUX_CHECK='
import importlib.metadata as md
import importlib.util
import os
import re
import sys
import tomllib

root, extra, mode = sys.argv[1:4]
spec = importlib.util.find_spec("flux")
here = os.path.join(root, "flux")
places = list(spec.submodule_search_locations or []) if spec else []
if not any(os.path.isdir(p) and os.path.samefile(p, here) for p in places):
    print("other", sys.prefix, "", sep="\t")
    sys.exit()
with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
wanted = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
try:
    from pip._vendor.packaging.requirements import Requirement
except ImportError:
    Requirement = None
missing = []
for text in wanted:
    if Requirement is None:  # no pip here: names only, entries with markers skipped
        if ";" in text:
            continue
        name, specifier = re.match(r"[A-Za-z0-9._-]+", text).group(), None
    else:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name, specifier = req.name, req.specifier
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
        continue
    if specifier and not specifier.contains(version, prereleases=True):
        missing.append(f"{name} {version} (needs {specifier})")
if not missing and mode == "import":
    try:
        import torch
        import flux.train
    except Exception as e:
        missing.append(f"import fails: {type(e).__name__}: {e}")
print("missing" if missing else "ready", sys.prefix, ", ".join(missing), sep="\t")
'

# Exits 0 when the index in argv[1] (https://... or file://...) has a page for torch.
_FLUX_INDEX_ANSWERS='
import os
import sys
import urllib.parse
import urllib.request

url = sys.argv[1].rstrip("/") + "/torch/"
parts = urllib.parse.urlparse(url)
if parts.scheme == "file":
    sys.exit(not os.path.isdir(urllib.request.url2pathname(parts.path)))
urllib.request.urlopen(url, timeout=5)
'

_flux_say() { echo "flux: $*" >&2; }
_flux_die() {
    echo "flux: error: $*" >&2
    exit 1
}

# _flux_check PYTHON EXTRA MODE: sets _flux_state, _flux_prefix, _flux_missing.
_flux_check() {
    local out
    out=$(cd / && "$1" -c "$_FLUX_CHECK" "$_FLUX_ROOT" "$2" "$3" 2>/dev/null) || out=""
    _flux_state=${out%%$'\t'*}
    out=${out#*$'\t'}
    _flux_prefix=${out%%$'\t'*}
    _flux_missing=${out#*$'\t'}
    case $_flux_state in ready | missing | other) ;; *) _flux_state=none ;; esac
}

# The marker's value for KEY ("" if absent).
_flux_mark_get() {
    [ -f "$_FLUX_MARK" ] && sed -n "s/^$1=//p" "$_FLUX_MARK" | head -n 1
    return 0
}

# _flux_mark_put COMPLETE EXTRAS TORCH_ARGS: rewrite the marker in one step.
_flux_mark_put() {
    {
        echo "complete=$1"
        echo "extras=$2"
        echo "torch=$3"
        echo "pyproject=$(cksum <"$_FLUX_ROOT/pyproject.toml")"
    } >"$_FLUX_MARK.tmp" && mv "$_FLUX_MARK.tmp" "$_FLUX_MARK"
}

_flux_has_extra() { # EXTRAS EXTRA: is EXTRA among the comma-separated EXTRAS?
    [ -z "$2" ] && return 0
    case ",$1," in *",$2,"*) return 0 ;; esac
    return 1
}

# Why .venv is not ready to use as it is ("" when it is).
_flux_venv_stale() {
    local extra=$1
    [ "$(_flux_mark_get complete)" = 1 ] || {
        echo "incomplete"
        return
    }
    [ -x "$_FLUX_VENV/bin/python" ] || {
        echo "python gone"
        return
    }
    [ "$(_flux_mark_get pyproject)" = "$(cksum <"$_FLUX_ROOT/pyproject.toml")" ] || {
        echo "pyproject.toml changed"
        return
    }
    _flux_has_extra "$(_flux_mark_get extras)" "$extra" || {
        echo "adding the $extra extra"
        return
    }
    if [ -n "${TORCH_SPEC:-}" ] && [ "$TORCH_SPEC" != "$(_flux_mark_get torch)" ]; then
        echo "TORCH_SPEC"
    fi
}

_flux_activate() {
    VIRTUAL_ENV=$_FLUX_VENV
    PATH="$_FLUX_VENV/bin:$PATH"
    export VIRTUAL_ENV PATH
    unset PYTHONHOME
}

# The Python that creates .venv: FLUX_PYTHON, else the first 3.11+ on PATH.
_flux_base_python() {
    local candidate version found=""
    if [ -n "${FLUX_PYTHON:-}" ]; then
        set -- "$FLUX_PYTHON"
    else
        set -- python3 python3.14 python3.13 python3.12 python3.11
    fi
    for candidate in "$@"; do
        if ! command -v "$candidate" >/dev/null 2>&1; then
            [ -n "${FLUX_PYTHON:-}" ] && found="$candidate is not found"
            continue
        fi
        version=$("$candidate" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) ||
            version="not a Python that runs"
        case $version in
            3.1[1-9].* | 3.[2-9][0-9].*)
                _flux_python=$candidate _flux_python_version=$version
                return 0
                ;;
        esac
        found="$found${found:+, }$candidate is $version"
    done
    if [ -n "${FLUX_PYTHON:-}" ]; then
        _flux_die "FLUX_PYTHON: $found, but setting up .venv needs Python 3.11 or newer: name one that is"
    fi
    _flux_die "setting up .venv needs Python 3.11 or newer, and there is none on PATH${found:+ ($found)}:" \
        "install one (python.org, pyenv, apt install python3.11-venv) or name it with FLUX_PYTHON=/path/to/python3.11"
}

_flux_has_nvidia_gpu() { nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

# Sets _flux_torch (pip's arguments for torch) and _flux_torch_kind (words for the user).
_flux_torch_choice() {
    local index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
    if [ -n "${TORCH_SPEC:-}" ]; then
        _flux_torch=$TORCH_SPEC _flux_torch_kind="$TORCH_SPEC (TORCH_SPEC)"
    elif _flux_has_nvidia_gpu; then
        _flux_torch=$_FLUX_TORCH_DEFAULT _flux_torch_kind="$_FLUX_TORCH_DEFAULT (CUDA build)"
    elif "$1" -c "$_FLUX_INDEX_ANSWERS" "$index" >/dev/null 2>&1; then
        _flux_torch="$_FLUX_TORCH_DEFAULT --extra-index-url $index"
        _flux_torch_kind="$_FLUX_TORCH_DEFAULT (CPU build: no NVIDIA GPU)"
    else
        # The CPU index does not answer: what pip finds (a local CPU wheel, or PyPI's build).
        _flux_torch=$_FLUX_TORCH_DEFAULT
        _flux_torch_kind="$_FLUX_TORCH_DEFAULT from your pip index (no NVIDIA GPU, but $index does not answer)"
    fi
}

# _flux_pip WHAT ARGS...: pip install into .venv, its output to the log; one line if it fails.
_flux_pip() {
    local what=$1 start output line
    shift
    echo "+ pip install $*" >>"$_FLUX_LOG"
    start=$(($(wc -l <"$_FLUX_LOG") + 1))
    "$_FLUX_VENV/bin/python" -m pip install --progress-bar off "$@" >>"$_FLUX_LOG" 2>&1 && return 0
    output=$(tail -n "+$start" "$_FLUX_LOG") # this call's, not an earlier run's
    if echo "$output" | grep -Eq 'NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|nodename nor servname|Network is unreachable|ConnectTimeout|Read timed out|ProxyError'; then
        _flux_die "could not reach the package index to install $what: check the network (or HTTPS_PROXY)," \
            "or point PIP_INDEX_URL at a mirror, then run again; log: $_FLUX_LOG"
    fi
    line=$(echo "$output" | grep -E '^ERROR: ' | head -n 1 | cut -c 1-200)
    _flux_die "installing $what failed${line:+ ($line)}; log: $_FLUX_LOG"
}

# Install torch and the package (with EXTRAS) into .venv, check that they import, mark it complete.
_flux_install() {
    local extras=$1 torch=$2 install_torch=$3 spec="." torch_args
    if [ "$install_torch" = 1 ]; then
        # TORCH_SPEC holds several pip arguments: split on spaces on purpose.
        read -r -a torch_args <<<"$torch"
        _flux_pip "torch" "${torch_args[@]}"
    fi
    [ -n "$extras" ] && spec=".[$extras]"
    _flux_pip "flux and its dependencies" -e "$_FLUX_ROOT/$spec"
    _flux_check "$_FLUX_VENV/bin/python" "$extras" import
    [ "$_flux_state" = ready ] || return 1
    _flux_mark_put 1 "$extras" "$torch"
}

# _flux_create EXTRAS WHY: (re)make .venv from nothing and install into it.
_flux_create() {
    local extras=$1 why=$2
    _flux_base_python
    _flux_torch_choice "$_flux_python"
    rm -rf "$_FLUX_VENV"
    mkdir -p "$_FLUX_VENV"
    _flux_mark_put 0 "$extras" "$_flux_torch"
    _flux_say "setting up .venv ($why): Python $_flux_python_version, $_flux_torch_kind," \
        "flux${extras:+[$extras]} and its dependencies"
    _flux_say "this takes a few minutes, once (1-4 with the CPU build; the CUDA build is several GB);" \
        "log: $_FLUX_LOG"
    echo "+ $_flux_python -m venv $_FLUX_VENV" >>"$_FLUX_LOG"
    if ! { "$_flux_python" -m venv "$_FLUX_VENV" && "$_FLUX_VENV/bin/python" -m pip --version; } \
        >>"$_FLUX_LOG" 2>&1; then
        _flux_die "$_flux_python ($_flux_python_version) could not make a virtual environment with pip" \
            "(Debian/Ubuntu: apt install python3-venv); log: $_FLUX_LOG"
    fi
    _flux_install "$extras" "$_flux_torch" 1 ||
        _flux_die "the new .venv does not import flux ($_flux_missing); log: $_FLUX_LOG"
}

_flux_setup() {
    local extra=$1 why extras torch start=$SECONDS
    why=$(_flux_venv_stale "$extra")
    [ -z "$why" ] && return 0 # another run finished it while this one waited for the lock
    extras=$(_flux_mark_get extras)
    _flux_has_extra "$extras" "$extra" || extras="$extras${extras:+,}$extra"
    torch=${TORCH_SPEC:-$(_flux_mark_get torch)}
    trap '_flux_say "set-up interrupted: run the same command again to finish it"; exit 130' INT TERM
    case $why in
        incomplete)
            if [ -n "$torch" ] && "$_FLUX_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
                _flux_say "finishing the set-up of .venv that an earlier run began (log: $_FLUX_LOG)"
                if ! _flux_install "$extras" "$torch" 1; then
                    _flux_say ".venv is broken ($_flux_missing): making it again"
                    _flux_create "$extras" "again: the earlier set-up left it broken"
                fi
            elif [ -e "$_FLUX_MARK" ]; then
                _flux_create "$extras" "again: an earlier set-up stopped before pip was in place"
            else
                _flux_create "$extras" "first run only"
            fi
            ;;
        "python gone")
            _flux_create "$extras" "again: the Python it was made with is gone"
            ;;
        *)
            _flux_say "updating .venv ($why; log: $_FLUX_LOG)"
            _flux_mark_put 0 "$extras" "$(_flux_mark_get torch)"
            if [ "$why" = TORCH_SPEC ]; then
                _flux_install "$extras" "$torch" 1
            else
                _flux_install "$extras" "$torch" 0
            fi || _flux_die ".venv does not import flux after the update ($_flux_missing); log: $_FLUX_LOG"
            ;;
    esac
    trap - INT TERM
    _flux_say ".venv ready in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s;" \
        "later runs start at once"
}

flux_use_env() {
    local extra=${1:-} spec="."
    _FLUX_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    _FLUX_VENV=$_FLUX_ROOT/.venv
    _FLUX_MARK=$_FLUX_VENV/flux-setup
    _FLUX_LOG=$_FLUX_VENV/flux-setup.log
    [ -n "$extra" ] && spec=".[$extra]"

    # 1. An environment the user made and activated.
    _flux_check python "$extra" check
    if [ "$_flux_state" != other ] && [ "$_flux_state" != none ] && ! [ "$_flux_prefix" -ef "$_FLUX_VENV" ]; then
        [ "$_flux_state" = ready ] && return 0
        _flux_die "the active environment ($_flux_prefix) has flux but lacks $_flux_missing:" \
            "pip install -e '$_FLUX_ROOT/$spec' in it, or deactivate it to let this script set up .venv"
    fi

    # 2. .venv, set up completely by an earlier run.
    if [ -z "$(_flux_venv_stale "$extra")" ]; then
        _flux_activate
        return 0
    fi

    # A .venv that these scripts did not make is the user's: used if it has flux, never changed.
    if [ -d "$_FLUX_VENV" ] && [ ! -e "$_FLUX_MARK" ] && [ -n "$(ls -A "$_FLUX_VENV")" ]; then
        _flux_check "$_FLUX_VENV/bin/python" "$extra" check
        if [ "$_flux_state" = ready ]; then
            _flux_activate
            return 0
        fi
        [ -n "$_flux_missing" ] || _flux_missing="this checkout's flux"
        _flux_die ".venv was not made by this script and lacks $_flux_missing:" \
            "$_FLUX_VENV/bin/pip install -e '$_FLUX_ROOT/$spec', or move .venv away to let this script set it up"
    fi

    # 3. Set up .venv, one run at a time (flock is Linux's; elsewhere, no lock).
    if command -v flock >/dev/null 2>&1; then
        exec 9<"$_FLUX_ROOT"
        flock -n 9 || {
            _flux_say "waiting for the set-up of .venv that another run is doing"
            flock 9
        }
    fi
    _flux_setup "$extra"
    exec 9<&-
    _flux_activate
}
