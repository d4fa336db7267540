"""The operator console: an aiohttp web app (web.py), its map mosaic (mosaic.py), its page.

console_node.py is the ROS side; this package never imports rclpy, so the web part and its
security rules are testable without ROS. The page's assets live in ``static/`` and are served
by the app itself (no CDN: the console works with no internet).
"""
