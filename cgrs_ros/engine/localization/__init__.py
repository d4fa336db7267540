"""Image -> position: where a downward camera frame was taken, from the satellite gallery.

:class:`Localizer` (localizer.py) matches frames with ``Retriever.query_image``, searching near
its last estimate (or a prior) first and the whole gallery when that fails; it turns the top
matches into a position with a covariance, or refuses an ambiguous frame with the reason.
:func:`rectify` turns a body-fixed camera frame north-up when the heading is known.
No ROS here: ``localization_node`` is the thin ROS shell around it.
"""

from cgrs_ros.engine.localization.localizer import (
    Estimate, Localizer, LocalizerSettings, Outcome, rectify)

__all__ = ['Estimate', 'Localizer', 'LocalizerSettings', 'Outcome', 'rectify']
