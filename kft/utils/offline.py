"""Downloads that fail fast: one sentence within seconds, never minutes.

Without a network, `keras.applications` weights, keras-hub presets and
tfds data sets retry for minutes (tfds: 3 min 29 s for `tf_flowers`)
before they give up. kft checks first: every place that downloads calls
`require_network`, which

- refuses at once, without touching the network, when `KFT_OFFLINE=1`
  (`kft run --offline` sets it), and
- otherwise checks that the host answers, with a hard time limit
  (`TIMEOUT` seconds in all; the DNS lookup runs in a thread, since a
  lookup ignores socket timeouts and can hang),

and raises `NetworkUnavailableError` with one sentence that says what
could not be downloaded and what to pass instead. A local file or
directory never goes through the check.

This module imports neither TensorFlow nor Keras: the light commands
(`kft list`, `kft validate`) stay light.
"""

import os
import socket
import threading
import time
import urllib.parse
import urllib.request

__all__ = [
    "OFFLINE_ENV",
    "TIMEOUT",
    "NetworkUnavailableError",
    "check_host",
    "is_local",
    "is_offline",
    "preset_host",
    "require_network",
    "require_preset",
]

OFFLINE_ENV = "KFT_OFFLINE"
# Seconds for the DNS lookup and the connection together. Well under the
# 10 s kft promises for a failed download, leaving time to start up.
TIMEOUT = 5.0

# Where keras-hub fetches a preset from, by the scheme of its address; a
# bare preset name is a Kaggle handle (keras-hub's built-in presets).
_PRESET_HOSTS = {
    "kaggle": ("KAGGLE_API_ENDPOINT", "https://www.kaggle.com"),
    "hf": ("HF_ENDPOINT", "https://huggingface.co"),
    "modelscope": ("MODELSCOPE_DOMAIN", "https://www.modelscope.cn"),
    "gs": (None, "https://storage.googleapis.com"),
}


class NetworkUnavailableError(RuntimeError):
    """A download kft needs cannot happen: offline, or no network.

    The message is one sentence: what could not be downloaded, why, and
    what to pass instead.
    """


def is_offline():
    """Whether `KFT_OFFLINE` forbids downloads (`1`, `true`, `yes`, `on`).

    Returns:
        True when kft must not touch the network at all.
    """
    value = os.environ.get(OFFLINE_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def is_local(source):
    """Whether `source` is an existing local file or directory.

    Args:
        source: a path, preset name or address (`hf://...`).

    Returns:
        True for a path that exists; such sources never need the network.
    """
    if not isinstance(source, (str, os.PathLike)):
        return False
    return os.path.exists(os.path.expanduser(os.fspath(source)))


def _resolve(host, port, timeout):
    """`socket.getaddrinfo` within `timeout` seconds (in a daemon thread:
    a hung lookup is abandoned, not waited for)."""
    result = {}

    def lookup():
        try:
            result["addresses"] = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except Exception as error:  # handed to the caller's thread
            result["error"] = error

    thread = threading.Thread(target=lookup, name=f"kft-resolve-{host}",
                              daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"looking up {host} took over {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["addresses"]


def _via_proxy(host, port, scheme):
    """`(host, port)` to check: the proxy's, when one serves `host`."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return host, port
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or host, parts.port or 8080


def check_host(host, port=443, timeout=TIMEOUT, scheme="https"):
    """Checks that `host` answers on `port`, in at most `timeout` seconds.

    With a proxy configured for `scheme` (`HTTPS_PROXY`, ...) the proxy is
    checked instead, as downloads go through it.

    Args:
        host: a host name or address, e.g. `"storage.googleapis.com"`.
        port: the TCP port.
        timeout: seconds for the lookup and the connection together.
        scheme: `"https"` or `"http"`, to pick the proxy.

    Returns:
        The seconds the check took.

    Raises:
        OSError: the host could not be resolved or reached in time
            (`TimeoutError` when time ran out).

    Example:

    ```python
    try:
        seconds = kft.utils.offline.check_host("huggingface.co", timeout=2.0)
    except OSError as error:
        print(f"no network: {error}")
    ```
    """
    start = time.monotonic()
    host, port = _via_proxy(host, port, scheme)
    addresses = _resolve(host, port, timeout)
    error = OSError(f"no address for {host}")
    for *_, address in addresses:
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            raise TimeoutError(f"{host} did not answer within {timeout:g} s")
        try:
            socket.create_connection(address[:2], timeout=left).close()
            return time.monotonic() - start
        except OSError as failure:
            error = failure
    raise error


def require_network(what, instead, url="https://storage.googleapis.com",
                    timeout=TIMEOUT, error=NetworkUnavailableError):
    """Raises one clear sentence unless `what` can be downloaded from `url`.

    Refuses at once, without any network call, when `is_offline()`;
    otherwise checks the URL's host with `check_host` (at most `timeout`
    seconds).

    Args:
        what: what would be downloaded, e.g. `"the ImageNet weights of
            backbone 'mobilenet_v2'"`.
        instead: what to pass instead, e.g. `"weights=None"`.
        url: where the download comes from (its host is checked).
        timeout: seconds the check may take.
        error: the class to raise, `NetworkUnavailableError` or a subclass
            (e.g. `kft.backbones.WeightsUnavailableError`).

    Raises:
        NetworkUnavailableError: offline, or the host did not answer.

    Example:

    ```python
    kft.utils.offline.require_network(
        "tfds data set 'tf_flowers'", "data_dir=<a prepared tfds folder>",
        url="https://download.tensorflow.org")
    ```
    """
    if is_offline():
        raise error(
            f"Not downloading {what}: kft is offline ({OFFLINE_ENV}=1 or "
            f"--offline); pass {instead}.")
    parts = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
    scheme = parts.scheme if parts.scheme in ("http", "https") else "https"
    port = parts.port or (80 if scheme == "http" else 443)
    start = time.monotonic()
    try:
        check_host(parts.hostname, port, timeout, scheme)
    except OSError as failure:
        reason = (str(failure).splitlines() or [type(failure).__name__])[0]
        raise error(
            f"Could not download {what}: no network ({parts.hostname} "
            f"unreachable after {time.monotonic() - start:.1f} s: {reason}); "
            f"pass {instead}.") from None


def preset_host(preset):
    """The URL keras-hub downloads `preset` from.

    Args:
        preset: a keras-hub preset name (a Kaggle handle), or an address
            `hf://...`, `kaggle://...`, `modelscope://...`, `gs://...`.

    Returns:
        A URL such as `"https://huggingface.co"` (honouring `HF_ENDPOINT`
        and `KAGGLE_API_ENDPOINT`).
    """
    preset = str(preset)
    scheme = preset.split("://", 1)[0].lower() if "://" in preset else "kaggle"
    variable, default = _PRESET_HOSTS.get(scheme, _PRESET_HOSTS["kaggle"])
    return (os.environ.get(variable) if variable else None) or default


def require_preset(preset, instead, what="keras-hub preset",
                   error=NetworkUnavailableError):
    """`require_network` for a keras-hub preset that is not a local path.

    A local directory or file returns at once, offline too.

    Args:
        preset: what would be passed to `from_preset`.
        instead: what to pass instead, e.g. `"a local directory in
            keras-hub or Hugging Face format"`.
        what: how to name the preset in the message.
        error: the class to raise (`NetworkUnavailableError` or a subclass).

    Raises:
        NetworkUnavailableError: offline, or the preset's host did not
            answer.
    """
    if not isinstance(preset, (str, os.PathLike)) or is_local(preset):
        return
    require_network(f"{what} {str(preset)!r}", instead,
                    url=preset_host(preset), error=error)
