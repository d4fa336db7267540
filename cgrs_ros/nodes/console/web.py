"""The console's web app (aiohttp): the page, its JSON API, a WebSocket of events, images.

The ROS side hands in a *bridge* (console_node.py) with the calls the page may make:
``send_goal(dict)``, ``confirm(result_id, rank)``, ``cancel()``, ``set_prior(x, y)``,
``clear_prior()``, ``publish_audio(bytes, rate)`` (async ones are awaited) and ``state()``
(which says, under ``voice``, whether push-to-talk has a listener).
Events from ROS reach every open page through :meth:`ConsoleApp.publish`, which any thread may
call.

Security, because a web server on a robot is a way in:

- It binds 127.0.0.1 unless told otherwise; any other bind needs a token
  (:func:`check_bind`), which every request must then carry (``?token=`` once, kept in an
  HttpOnly SameSite=Strict cookie, or ``Authorization: Bearer``).
- On a loopback bind the Host header must name the loopback (no DNS rebinding), and requests
  that change something (POST, the WebSocket) must come from the console's own origin, so
  another web page open in the operator's browser cannot send the drone anywhere.
- Images are served by gallery image id, never by path: the id is looked up in the manifest
  and the file must resolve inside the gallery folder (a symlink out of it is refused).
- The page treats every string as text (textContent, never innerHTML) under a
  Content-Security-Policy that allows only the console's own scripts: input is never executed.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import os
from pathlib import Path
import threading
from urllib.parse import urlsplit

from aiohttp import web, WSMsgType
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.nodes.console import mosaic

STATIC = Path(__file__).resolve().parent / 'static'
TOKEN_COOKIE = 'cgrs_console_token'
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; media-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
MAX_BODY = 4 * 1024 * 1024   # the largest request body (push-to-talk audio), bytes
THUMB_CACHE = 512
logger = logging.getLogger(__name__)


def is_loopback(host):
    """Whether ``host`` (an address or name) only listens on this machine."""
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host, token):
    """Refuse a bind beyond loopback without a token (ConfigError naming the fix)."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f'console.host {host!r} is reachable from other machines, so the console needs a '
            'token: set console.token (or the CGRS_CONSOLE_TOKEN environment variable) to a '
            'long random string, or bind 127.0.0.1')


class ConsoleApp:
    """The aiohttp application and the thread its event loop runs on."""

    def __init__(self, bridge, gallery, datum, host='127.0.0.1', port=8080, token='',
                 map_side=1600, tile_m=0.0):
        """Prepare the app; :meth:`start` binds and serves."""
        check_bind(host, token)
        self.bridge, self.gallery, self.datum = bridge, gallery, datum
        self.host, self.port, self.token = host, port, token
        self._map_side, self._tile_m = map_side, tile_m
        self._map = None          # (jpeg, MapMeta), drawn on first request
        self._map_lock = threading.Lock()
        self._thumbs = {}
        self._root = Path(gallery.root).resolve()
        self._sockets = set()
        self._loop = None
        self._runner = None
        self._thread = None
        self._ready = threading.Event()
        self._error = None

    # ---- life cycle -------------------------------------------------------------------
    def start(self, timeout=30.0):
        """Serve on a thread of its own; return the bound port (ConfigError if it cannot)."""
        self._thread = threading.Thread(target=self._serve, name='cgrs-console', daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ConfigError('the console web server did not start in time')
        if self._error is not None:
            raise self._error
        return self.port

    def _serve(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._bind())
        except OSError as exc:
            self._error = ConfigError(
                f'the console cannot listen on {self.host}:{self.port} ({exc.strerror or exc});'
                ' another program (or console) uses it: set console.port to a free port')
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _bind(self):
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.add_routes([
            web.get('/', self._index),
            web.get('/api/state', self._state),
            web.get('/api/map', self._map_meta),
            web.get('/map.jpg', self._map_image),
            web.get('/thumb/{image_id}', self._thumb),
            web.get('/ws', self._websocket),
            web.post('/api/goal', self._goal),
            web.post('/api/confirm', self._confirm),
            web.post('/api/cancel', self._cancel),
            web.post('/api/prior', self._prior),
            web.post('/api/audio', self._audio),
        ])
        # aiohttp's static route: no directory listing, no symlinks out, no '..'.
        app.router.add_static('/static/', STATIC, follow_symlinks=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the port, when 0 (any) was asked

    def stop(self):
        """Close the sockets and stop the server thread."""
        if self._loop is None or not self._loop.is_running():
            return
        for ws in list(self._sockets):
            asyncio.run_coroutine_threadsafe(ws.close(), self._loop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)

    # ---- events to the pages -----------------------------------------------------------
    def publish(self, event):
        """Send ``event`` (a JSON-able dict) to every open page; safe from any thread."""
        if self._loop is None or not self._loop.is_running():
            return
        self._loop.call_soon_threadsafe(self._broadcast, _dumps(event))

    def _broadcast(self, text):
        for ws in list(self._sockets):
            if not ws.closed:
                self._loop.create_task(ws.send_str(text))

    # ---- security ---------------------------------------------------------------------
    def _token_ok(self, request):
        given = (request.query.get('token') or request.cookies.get(TOKEN_COOKIE) or
                 request.headers.get('Authorization', '').removeprefix('Bearer ').strip())
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _host_ok(self, request):
        if not is_loopback(self.host):
            return True  # the token guards a wider bind
        name = urlsplit(f'//{request.host}').hostname or ''
        return is_loopback(name)

    def _origin_ok(self, request):
        origin = request.headers.get('Origin')
        return origin is None or origin == f'{request.scheme}://{request.host}'

    @web.middleware
    async def _guard(self, request, handler):
        if not self._host_ok(request):
            return web.Response(status=421, text='this console answers only to its own host')
        if self.token and not self._token_ok(request):
            return web.Response(status=401, text='a valid console token is required '
                                '(open the console at /?token=...)')
        changing = request.method != 'GET' or request.path == '/ws'
        if changing and not self._origin_ok(request):
            return web.Response(status=403, text='cross-origin requests are refused')
        response = await handler(request)
        response.headers['Content-Security-Policy'] = CSP
        response.headers['X-Content-Type-Options'] = 'nosniff'
        response.headers['Referrer-Policy'] = 'no-referrer'
        if self.token and request.query.get('token'):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite='Strict')
        return response

    # ---- pages and pictures ------------------------------------------------------------
    async def _index(self, request):
        return web.FileResponse(STATIC / 'index.html',
                                headers={'Cache-Control': 'no-store'})

    async def _state(self, request):
        return web.json_response(self.bridge.state(), dumps=_dumps)

    def _mosaic(self):
        with self._map_lock:
            if self._map is None:
                self._map = mosaic.render_mosaic(self.gallery, self.datum, self._confined,
                                                 self._map_side, self._tile_m)
            return self._map

    async def _map_meta(self, request):
        _, meta = await self._loop.run_in_executor(None, self._mosaic)
        return web.json_response(meta.to_dict())

    async def _map_image(self, request):
        jpeg, _ = await self._loop.run_in_executor(None, self._mosaic)
        return web.Response(body=jpeg, content_type='image/jpeg',
                            headers={'Cache-Control': 'max-age=3600'})

    def _confined(self, item):
        """Return the resolved image file of ``item``, or None when it lies outside the gallery.

        A symlink or a manifest path leading out of the gallery folder is never served.
        """
        path = Path(self.gallery.path_of(item)).resolve()
        if path.is_relative_to(self._root):
            return path
        logger.warning('refused to serve %s: it lies outside the gallery %s', path, self._root)
        return None

    def gallery_file(self, image_id):
        """Return the image file of ``image_id`` inside the gallery folder.

        Raises HTTPNotFound for an unknown id and HTTPForbidden for a file outside the gallery.
        """
        item = self.gallery.get(image_id)
        if item is None:
            raise web.HTTPNotFound(text=f'no gallery image {image_id[:100]!r}')
        path = self._confined(item)
        if path is None:
            raise web.HTTPForbidden(text='that image lies outside the gallery folder')
        return path

    async def _thumb(self, request):
        image_id = request.match_info['image_id']
        jpeg = self._thumbs.get(image_id)
        if jpeg is None:
            path = self.gallery_file(image_id)
            try:
                jpeg = await self._loop.run_in_executor(None, mosaic.thumbnail, path)
            except (OSError, ValueError) as exc:
                raise web.HTTPNotFound(text=f'image {image_id!r} cannot be read ({exc})')
            if len(self._thumbs) >= THUMB_CACHE:
                self._thumbs.pop(next(iter(self._thumbs)))
            self._thumbs[image_id] = jpeg
        return web.Response(body=jpeg, content_type='image/jpeg',
                            headers={'Cache-Control': 'max-age=3600'})

    # ---- actions ------------------------------------------------------------------------
    async def _websocket(self, request):
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await ws.send_str(_dumps({'type': 'state', **self.bridge.state()}))
            async for message in ws:  # the page only listens; anything it sends is ignored
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self._sockets.discard(ws)
        return ws

    async def _goal(self, request):
        body = await _json_body(request)
        text = body.get('text')
        if not isinstance(text, str) or not text.strip():
            return _problem('type a goal first, e.g. "the red-roofed building by the plaza"')
        fields = {'text': text, 'platform': str(body.get('platform') or ''),
                  'policy': str(body.get('policy') or ''), 'top_k': _int(body.get('top_k'))}
        return web.json_response(await _maybe_await(self.bridge.send_goal(fields)))

    async def _confirm(self, request):
        body = await _json_body(request)
        rank = _int(body.get('rank'))
        if rank is None or rank < 0:
            return _problem('rank must be a whole number: 1 = best, 0 = dismiss')
        answer = await _maybe_await(self.bridge.confirm(str(body.get('result_id') or ''),
                                                        rank))
        return web.json_response(answer, status=200 if answer.get('ok') else 409)

    async def _cancel(self, request):
        return web.json_response(await _maybe_await(self.bridge.cancel()))

    async def _prior(self, request):
        body = await _json_body(request)
        if body.get('clear'):
            return web.json_response(await _maybe_await(self.bridge.clear_prior()))
        try:
            x, y = float(body['x']), float(body['y'])
        except (KeyError, TypeError, ValueError):
            return _problem('a map click needs x and y in metres (map frame)')
        if not all(map(_finite, (x, y))):
            return _problem('x and y must be finite numbers')
        return web.json_response(await _maybe_await(self.bridge.set_prior(x, y)))

    async def _audio(self, request):
        """Push-to-talk: 16-bit mono PCM recorded by the page, handed to the bridge."""
        rate = _int(request.query.get('rate'))
        if rate is None or not 8000 <= rate <= 192000:
            return _problem('rate must be the sample rate in Hz (8000-192000)')
        data = await request.read()
        if not data or len(data) % 2:
            return _problem('the body must be 16-bit little-endian mono PCM')
        return web.json_response(await _maybe_await(self.bridge.publish_audio(data, rate)))


def _finite(value):
    return value == value and abs(value) != float('inf')


def _int(value):
    try:
        return None if value is None or value == '' else int(value)
    except (TypeError, ValueError):
        return None


def _problem(message):
    return web.json_response({'ok': False, 'message': message}, status=400)


def _plain(value):
    """Return ``value`` with NaN and infinities as None (JSON has no NaN; browsers refuse it)."""
    if isinstance(value, float):
        return value if _finite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _dumps(value):
    return json.dumps(_plain(value), allow_nan=False, default=str)


async def _json_body(request):
    if request.content_type != 'application/json':
        raise web.HTTPUnsupportedMediaType(text='send JSON (Content-Type: application/json)')
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='the request body is not valid JSON') from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='the request body must be a JSON object')
    return body


async def _maybe_await(value):
    return await value if asyncio.isfuture(value) or asyncio.iscoroutine(value) else value


def token_from(params_token):
    """Return the console token: the parameter, else the CGRS_CONSOLE_TOKEN variable."""
    return params_token or os.environ.get('CGRS_CONSOLE_TOKEN', '')
