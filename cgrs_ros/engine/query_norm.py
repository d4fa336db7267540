"""Query normalization: removing orientation words and the spoken command around a goal.

A satellite tile is a nadir view whose "up" is an arbitrary choice of the tile grid, and an
operator's "north of", "on the left", "upper-right corner" refer to their own viewpoint, not
to anything a tile encodes. The RoboSense 2025 Track 4 winner (TeleAI) removed such words from
queries matched against satellite images. We do the same, with a hand-written list (no
library ships one): cardinal and intercardinal directions with their adjective, adverb and
"of"/"side" forms, left/right, and top/bottom/upper/lower when they name a part of the view.

Whole phrases go, not just the word ("to the north of the river" -> "the river"), so what is
left still reads as a description. If nothing but orientation words was said, the query is
kept as it was (an empty query would match everything equally).
"""

import re

_CARDINAL = r'(?:north|south|east|west)'
_DIRECTION = (
    rf'(?:{_CARDINAL}(?:[- ]?{_CARDINAL})?(?:ern|erly|wards?)?'
    r'|left(?:most|[- ]hand)?|right(?:most|[- ]hand)?)')
_VERTICAL = r'(?:top|bottom|upper|lower)(?:most)?'
_PART = r'(?:side|part|corner|edge|half|portion|area|section|end|border)s?'

# "upper left", "top-right", "lower left-hand": a vertical word joined to a direction.
_COMPOUND = rf'(?:{_VERTICAL}[- ]?{_DIRECTION}|{_DIRECTION}(?:[- ]{_VERTICAL})?)'
# "top part", "bottom edge": a vertical word only counts when it names a part of the view.
_VERTICAL_PART = rf'{_VERTICAL}\s+{_PART}'

_PHRASE = re.compile(
    r'\b(?:(?:on|to|at|in|toward|towards|from|facing)\s+)?(?:the\s+)?'
    rf'(?:{_VERTICAL_PART}|{_COMPOUND}(?:\s+{_PART})?)'
    r'(?:\s+(?:of|from)\b)?\b(?!-\w)',
    re.IGNORECASE)
_SPACES = re.compile(r'\s+')
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.;:!?])')
_REPEATED_PUNCT = re.compile(r'([,;:])(?:\s*[,;:])+')
_EDGE_PUNCT = re.compile(r'^[\s,;:]+|[\s,;:]+$')


def remove_orientation_words(text):
    """Return ``text`` without orientation words and phrases (unchanged if nothing else is left).

    >>> remove_orientation_words('the red roof north of the river, upper-left corner')
    'the red roof the river'
    """
    stripped = _PHRASE.sub(' ', text)
    stripped = _SPACES.sub(' ', stripped)
    stripped = _SPACE_BEFORE_PUNCT.sub(r'\1', stripped)
    stripped = _REPEATED_PUNCT.sub(r'\1', stripped)
    stripped = _EDGE_PUNCT.sub('', stripped).strip()
    # A dangling article or preposition left at the very end ("... and the") carries nothing.
    stripped = re.sub(r'(?:\s+(?:the|of|on|to|at|in|and))+$', '', stripped, flags=re.I)
    if not re.search(r'\w', stripped):
        return ' '.join(text.split())
    return stripped


def has_orientation_words(text):
    """Return True when :func:`remove_orientation_words` would change ``text``."""
    return remove_orientation_words(text) != ' '.join(text.split())


# A goal is usually said as a command ("fly to ...", "take me to ...", "can you go over to
# ..."). The command names what the drone should do, not what the place looks like, and it
# pulls a sentence embedding toward every other command instead of toward the description.
# Hand-written (no library lists navigation commands): optional politeness, a motion verb or
# "take/bring me", optional "over/back", "to"; or "find"/"show me"/"where is".
_COMMAND = re.compile(
    r'^\s*(?:(?:ok(?:ay)?|hey|drone|please)[,!]?\s+)*'
    r'(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?|i\s+(?:want|would\s+like|need)\s+'
    r'(?:you\s+)?to\s+|let\'?s\s+)?'
    r'(?:(?:fly|go|head|navigate|move|travel|get|drive|return|proceed)(?:\s+(?:over|back|on|down'
    r'|up))?\s+to|(?:take|bring|get|send)\s+(?:me|us|the\s+drone|it)(?:\s+(?:over|back))?\s+to'
    r'|(?:find|locate|show\s+me|search\s+for|look\s+for)|where\s+is)\s+',
    re.IGNORECASE)


def remove_command_words(text):
    """Return ``text`` without a leading spoken command (unchanged if nothing else is left).

    >>> remove_command_words('Please fly over to the red roof by the plaza.')
    'the red roof by the plaza.'
    """
    stripped = _COMMAND.sub('', text, count=1).strip()
    return stripped if re.search(r'\w', stripped) else ' '.join(text.split())
