"""The words a gallery's places are described with, to bias the recogniser towards them.

A recogniser trained on general English hears "slate roofed" as "slate roof did" and
"roundabout" as "round about"; the gallery knows which words its places are described with.
:class:`Vocabulary` collects the sentences of the manifest descriptions (and configured extra
phrases: place names, words users say that the gallery lacks), in the spoken form recognisers
write (lower case, no punctuation, hyphens as spaces, numbers as words), plus the command
phrases goals start with. Backends take what they can use: pocketsphinx a trigram language
model built from the sentences (``pocketsphinx.lm.ArpaBoLM``), whisper an initial prompt.
:meth:`Vocabulary.written` turns a transcript back into the gallery's spelling
("slate roofed" -> "slate-roofed").
"""

import collections
import dataclasses
import re

from cgrs_ros.engine.errors import GalleryError

# How spoken goals start; part of the language model so "fly to ..." is expected.
COMMAND_PHRASES = ('fly to', 'go to', 'take me to', 'navigate to', 'head to', 'move to',
                   'find', 'show me', 'i want to go to', 'fly over to', 'go over to')
# Probability mass the trigram model keeps for unseen word sequences (ArpaBoLM's default is
# 0.5). Spoken goals follow the gallery's phrasing closely: chosen on validation goals (other
# sentences than those the figures report), mean WER over three espeak voices 0.5: 13.2%,
# 0.35: 10.5%, 0.2: 8.7%, 0.1: 8.4%; 0.2 leaves more room for phrasings the gallery lacks.
DISCOUNT_MASS = 0.2
_NUMBER = re.compile(r'\d+(?:\.\d+)?')
_SENTENCE_END = re.compile(r'[.!?;]+(?:\s|$)')


def _number_words(match):
    from num2words import num2words
    return ' ' + num2words(float(match.group()) if '.' in match.group()
                           else int(match.group())) + ' '


def spoken_form(text):
    """Return ``text`` as a recogniser writes it: 'L-shaped, 220 cars' -> 'l shaped two ...'."""
    text = _NUMBER.sub(_number_words, text.lower())
    text = re.sub(r"[^a-z']+", ' ', text.replace('-', ' '))
    return ' '.join(word.strip("'") for word in text.split() if word.strip("'"))


def sentences_of(text):
    """Return the sentences of a description, each in spoken form (empty ones dropped)."""
    parts = (spoken_form(part) for part in _SENTENCE_END.split(text))
    return [part for part in parts if part]


@dataclasses.dataclass
class Vocabulary:
    """Sentences in spoken form and the hyphenated spellings they came from."""

    sentences: list = dataclasses.field(default_factory=list)
    compounds: dict = dataclasses.field(default_factory=dict)   # ('slate', 'roofed') -> text
    source: str = 'none'

    @classmethod
    def from_texts(cls, texts, phrases=(), source='texts', commands=COMMAND_PHRASES):
        """Build a vocabulary from description texts, extra phrases and command phrases."""
        sentences, compounds = [], {}
        for text in [*texts, *phrases]:
            for sentence in sentences_of(text):
                sentences.append(sentence)
                # Goals name a described place with "the": "a red roof..." -> "the red roof...".
                first, _, rest = sentence.partition(' ')
                if first in ('a', 'an') and rest:
                    sentences.append(f'the {rest}')
            for compound in re.findall(r"[A-Za-z']+(?:-[A-Za-z']+)+", text):
                compounds[tuple(compound.lower().split('-'))] = compound.lower()
        sentences.extend(spoken_form(f'{command} the') for command in commands)
        return cls(sentences, compounds, source)

    @classmethod
    def from_gallery(cls, gallery_dir, phrases=()):
        """Build a vocabulary from the manifest descriptions of ``gallery_dir``."""
        from cgrs_ros.engine.gallery import load_gallery
        try:
            gallery = load_gallery(gallery_dir, check_images='none')
        except GalleryError as exc:
            raise GalleryError(f'the speech vocabulary reads the gallery: {exc}') from None
        texts = [text for item in gallery for text in item.descriptions]
        return cls.from_texts(texts, phrases, source=f'gallery {gallery_dir}')

    @property
    def words(self):
        """Return the distinct words, most frequent first."""
        counts = collections.Counter(w for sentence in self.sentences for w in sentence.split())
        return [word for word, _ in counts.most_common()]

    def arpa(self):
        """Return a trigram language model of the sentences in ARPA text format."""
        import io

        from pocketsphinx.lm import ArpaBoLM
        model = ArpaBoLM(text='\n'.join(self.sentences) + '\n', add_start=True,
                         discount_mass=DISCOUNT_MASS)
        model.compute()
        out = io.StringIO()
        model.write(out)
        return out.getvalue()

    def prompt(self, max_words=120):
        """Return a whisper initial prompt: the vocabulary's words, most frequent first."""
        words = [w for w in self.words if len(w) > 2][:max_words]
        return ('Drone goals describing places seen from above: '
                + ', '.join(words) + '.') if words else ''

    def written(self, text):
        """Return a transcript with the gallery's hyphenated compounds restored."""
        if not self.compounds:
            return text
        words = text.split()
        out, i = [], 0
        longest = max(len(parts) for parts in self.compounds)
        while i < len(words):
            for size in range(min(longest, len(words) - i), 1, -1):
                compound = self.compounds.get(tuple(w.lower() for w in words[i:i + size]))
                if compound:
                    out.append(compound)
                    i += size
                    break
            else:
                out.append(words[i])
                i += 1
        return ' '.join(out)
