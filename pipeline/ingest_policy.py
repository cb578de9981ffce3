"""Ingest's policy: which rows are refused before any download and why, and what each download
error means.

  before downloading   precheck (an http(s) URL, not blocklisted, a public host: AddressPolicy),
                       caption_problems (UTF-8, no NUL bytes, at most MAX_CAPTION_BYTES);
                       redirects to a private address are refused while downloading too
  after                classify_error: img2dataset's error message -> a short, stable reason;
                       DROP_REASONS are decisions (dropped), every other reason an error (failed);
                       is_retryable: worth another attempt; reason_fix: what a user can do
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

import fsspec
import pyarrow as pa

from capfilt.errors import ConfigError

RETRYABLE_REASONS = ("timeout", "connection_error", "dns_error")  # and every http_5xx
# Reasons that are a decision about the row (dropped); every other reason is an error (failed).
DROP_REASONS = {
    "invalid_url",
    "private_address",
    "blocklisted",
    "opt_out",
    "too_many_pixels",
    "image_too_small",
    "aspect_ratio_too_large",
    "bad_caption",
    "duplicate_url",
}
# Longer "alt text" is a page or a payload, not a caption; it would only cost tokenizer time and
# Parquet space downstream (LAION's longest captions are a few KB).
MAX_CAPTION_BYTES = 65_536


def read_blocklist(path: str | None, option: str = "blocklist") -> tuple[str, ...]:
    """Lines of a blocklist file (URLs or host names; or sha256 hex digests), comments skipped."""
    if not path:
        return ()
    try:
        with fsspec.open(path, "r") as handle:
            lines = [line.strip() for line in handle]
    except FileNotFoundError as exc:
        raise ConfigError(f"{option}: blocklist file {path} does not exist; check the path.") from exc
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option}: blocklist file {path} is not a text file of one entry per line ({exc}).") from exc
    return tuple(sorted({line for line in lines if line and not line.startswith("#")}))


# -- checks before downloading --------------------------------------------------------------

def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
        or (ip.version == 6 and ip.ipv4_mapped is not None and not _is_public(str(ip.ipv4_mapped)))
    )


class AddressPolicy:
    """Refuses URLs whose host is, or resolves to, a private, loopback or link-local address."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self._cache: dict[str, tuple[str, str] | None] = {}

    def check_host(self, host: str) -> tuple[str, str] | None:
        """None when the host may be fetched, else (reason, message)."""
        if self.allow_private:
            return None
        if host not in self._cache:
            try:
                infos = socket.getaddrinfo(host, None)
                addresses = sorted({info[4][0] for info in infos})
            except (socket.gaierror, UnicodeError) as exc:
                # Unresolvable hosts are left to the download, which reports them as errors.
                self._cache[host] = None if isinstance(exc, socket.gaierror) else ("invalid_url", str(exc))
                return self._cache[host]
            private = [a for a in addresses if not _is_public(a)]
            self._cache[host] = (
                ("private_address", f"host {host} resolves to non-public address(es) {private}; "
                 f"pass --allow-private-addresses to fetch such URLs")
                if private else None
            )
        return self._cache[host]


def precheck(url: str | None, policy: AddressPolicy, url_blocklist: frozenset[str]) -> tuple[str, str] | None:
    """None when the URL may be downloaded, else (reason, message)."""
    if not url or not url.strip():
        return "invalid_url", "empty URL"
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "invalid_url", f"not an http(s) URL: {url[:200]}"
    host = parsed.hostname.lower()
    if url in url_blocklist or any(host == b or host.endswith("." + b) for b in url_blocklist if "/" not in b):
        return "blocklisted", "URL or host is on the URL blocklist"
    return policy.check_host(host)


class NoPrivateRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to hosts the address policy allows (a public URL must not bounce
    the downloader into a private network)."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        host = urllib.parse.urlsplit(newurl).hostname or ""
        verdict = self.policy.check_host(host.lower())
        if verdict is not None:
            raise urllib.error.HTTPError(newurl, code, f"redirect to private address: {verdict[1]}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# -- img2dataset's error strings -> capfilt reasons -----------------------------------------

def classify_error(message: str) -> str:
    """A short, stable reason for an img2dataset error message."""
    text = (message or "").lower()
    if "x-robots-tag" in text:
        return "opt_out"
    if "redirect to private address" in text:
        return "private_address"
    if "infinite loop" in text or ("redirect" in text and "error" in text):
        return "redirect_loop"
    match = re.search(r"http error (\d{3})", text)
    if match:
        code = int(match.group(1))
        return f"http_{code}"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    for marker, reason in (
        ("too many pixels", "too_many_pixels"),
        ("image area too large", "too_many_pixels"),
        ("truncated", "truncated_image"),
        ("html page", "html_page"),
        ("not an image", "not_an_image"),
        ("image decoding error", "not_an_image"),
        ("image too small", "image_too_small"),
        ("aspect ratio too large", "aspect_ratio_too_large"),
        ("name or service not known", "dns_error"),
        ("nodename nor servname", "dns_error"),
        ("temporary failure in name resolution", "dns_error"),
        ("connection refused", "connection_error"),
        ("connection reset", "connection_error"),
        ("remote end closed", "connection_error"),
        ("unknown url type", "invalid_url"),
    ):
        if marker in text:
            return reason
    return "download_error"


# What a user can do about a reason, shown when a run keeps nothing or loses most of its rows.
REASON_FIXES = {
    "private_address": "pass --allow-private-addresses to download from a local or private server",
    "invalid_url": "check that --url-col names the column holding http(s) URLs",
    "timeout": "raise --timeout, or rerun with --retry-failed when the server is back",
    "connection_error": "check that the server is up, then rerun with --retry-failed",
    "dns_error": "check the host names and this machine's network, then rerun with --retry-failed",
    "opt_out": "the servers opted out of AI use (X-Robots-Tag); capfilt honours it",
    "blocklisted": "the URLs, hosts or image hashes are on --url-blocklist / --hash-blocklist",
    "too_many_pixels": "raise --max-pixels if these images are wanted",
    "image_too_small": "lower --min-image-size",
    "aspect_ratio_too_large": "raise --max-aspect-ratio",
    "bad_caption": "fix the source's caption column: UTF-8 text without NUL bytes, at most 64 KiB",
    "duplicate_url": "nothing to do: the first row with each URL is downloaded (is the source listed twice?)",
}


def reason_fix(reason: str) -> str:
    if reason in REASON_FIXES:
        return REASON_FIXES[reason]
    if reason.startswith("http_5"):
        return "the server failed; rerun with --retry-failed when it is back"
    if reason.startswith("http_4"):
        return "the URLs are gone or refused; nothing to retry"
    return "see rejected/ingest/ for each row's error_message"


def is_retryable(reason: str) -> bool:
    return reason in RETRYABLE_REASONS or reason.startswith("http_5")


# -- captions ---------------------------------------------------------------------------------

def caption_problems(column: pa.ChunkedArray) -> tuple[pa.Array, list[str | None]]:
    """(captions as valid UTF-8, per row None or why the caption is unusable).

    Read as bytes: Parquet does not guarantee its strings are UTF-8, and one bad caption must
    drop its row, not fail the shard. An unusable caption is kept in rejected/ shortened (a
    megabyte) or with U+FFFD for the bytes that are not UTF-8, so it can still be looked at.
    """
    texts, problems = [], []
    for value in column.cast(pa.binary()).to_pylist():
        problem = None
        if value is None:
            texts.append(None)
            problems.append(None)
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = value.decode("utf-8", errors="replace")
            problem = f"caption is not valid UTF-8 (byte {exc.start}: {value[exc.start:exc.start + 1]!r})"
        if len(value) > MAX_CAPTION_BYTES:
            problem = f"caption is {len(value):,} bytes, more than {MAX_CAPTION_BYTES:,} (kept here: its first 1,000 characters)"
            text = text[:1000]
        elif "\x00" in text:
            problem = f"caption holds {text.count(chr(0))} NUL byte(s)"
        texts.append(text)
        problems.append(problem)
    return pa.array(texts, pa.string()), problems
