"""Bounded HTTP for model backends behind a server (captioner now; rerankers and speech next).

``requests`` bounds each socket read, not a request: a server that drips one byte a second
never trips a read timeout, and ``response.json()`` reads whatever size the server sends. Here
one POST is bounded three ways, whatever the server does:

- a total deadline (``timeout_s``) over connecting, waiting and reading the body;
- a maximum body size (``max_bytes``), read in chunks and dropped past the cap;
- no redirects: a 3xx is an error naming where it pointed (the request carries an image and
  maybe an API key, and must not be re-sent to a host the user did not name).

Written here because requests has no total deadline or size cap of its own (it reads what it
is sent); the streaming read loop is the usual way to get both.
"""

import json
import socket
import time

import requests
import urllib3

READ_CHUNK = 64 * 1024


class BoundedHTTPError(Exception):
    """A request that broke a bound: ``kind`` is 'deadline', 'too_large' or 'redirect'."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class BoundedResponse:
    """Status, headers and the (size-capped) body of one bounded request."""

    def __init__(self, status_code, headers, content):
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self):
        """Return the body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.content.decode('utf-8', errors='replace')

    def json(self):
        """Return the body parsed as JSON (ValueError when it is not)."""
        return json.loads(self.content)


def post_json(session, url, body, timeout_s, max_bytes, files=None):
    """POST ``body`` as JSON and return a :class:`BoundedResponse` within the bounds.

    With ``files`` ({field: (name, bytes, content type)}) the body's fields and the files are
    sent as a multipart form instead (OpenAI's /audio/transcriptions takes that).

    Raises BoundedHTTPError when the deadline passes, the body exceeds ``max_bytes`` or the
    server redirects; requests' own exceptions for connection failures.
    """
    deadline = time.monotonic() + timeout_s
    try:
        content = {'data': body, 'files': files} if files else {'json': body}
        response = session.post(url, **content, timeout=timeout_s, stream=True,
                                allow_redirects=False)
    except requests.Timeout:
        raise BoundedHTTPError('deadline', f'no answer from {url} within {timeout_s:g} s') \
            from None
    with response:
        if response.is_redirect or 300 <= response.status_code < 400:
            where = response.headers.get('Location', '?')
            raise BoundedHTTPError(
                'redirect', f'{url} redirected ({response.status_code}) to {where}; redirects '
                'are not followed: set base_url to the address that answers')
        declared = response.headers.get('Content-Length')
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise BoundedHTTPError('too_large', f'{url} announced {int(declared)} bytes, more '
                                   f'than the {max_bytes} allowed')
        chunks, size = [], 0
        try:
            while True:
                # read1: whatever has arrived (one socket read), so a drip cannot hold a
                # read open past the deadline the way read(n) waiting for n bytes would.
                chunk = response.raw.read1(READ_CHUNK, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise BoundedHTTPError('too_large', f'{url} sent more than the {max_bytes} '
                                           'bytes allowed')
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise BoundedHTTPError('deadline', f'{url} did not finish its answer within '
                                           f'{timeout_s:g} s')
        except (urllib3.exceptions.ReadTimeoutError, socket.timeout):
            raise BoundedHTTPError('deadline', f'{url} did not finish its answer within '
                                   f'{timeout_s:g} s') from None
        except urllib3.exceptions.HTTPError as exc:
            raise requests.exceptions.ConnectionError(str(exc)) from None
        return BoundedResponse(response.status_code, response.headers, b''.join(chunks))
