"""ROS 2 nodes: thin shells over cgrs_ros.engine."""
