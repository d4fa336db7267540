"""The retrieval engine: pure Python, never imports rclpy (the nodes and the CLI wrap it)."""
