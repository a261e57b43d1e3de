"""Text for the MiniLM pruning example, all available offline.

- Calibration and fine-tuning: the prose of Python's own documentation, shipped with
  the standard library as ``pydoc_data.topics`` (the reference-manual topics that
  ``help()`` shows), tokenized and cut into fixed-length chunks. The chunks are split
  once, by a fixed shuffle, into a calibration part and a disjoint fine-tuning part.
- Vocabulary mixing for fine-tuning: :func:`common_words`, the tokenizer's whole-word
  tokens in its frequency order (BERT's WordPiece vocabulary lists words by how often
  they occur in general English), to replace the words of some fine-tuning windows so
  that distillation also sees everyday vocabulary, not only documentation prose.
- Evaluation: :data:`HELD_OUT`, everyday sentences written for this example (none is
  documentation prose), grouped loosely by topic with some near-paraphrases, so the
  pairwise-similarity matrix has structure worth preserving.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HELD_OUT", "common_words", "documentation_chunks", "split_chunks"]

CLS, SEP = 101, 102


def documentation_text() -> str:
    """The standard library's documentation topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def documentation_chunks(tokenizer, length: int = 128) -> np.ndarray:
    """``(chunks, length)`` int32 token ids: ``[CLS] <length - 2 tokens> [SEP]`` cut
    from :func:`documentation_text` end to end (the incomplete tail is dropped). Every
    token is real, so the attention mask of a chunk is all ones."""
    if length < 3:
        raise ValueError(f"length={length}: a chunk needs [CLS], [SEP] and a token")
    tok = tokenizer
    # A copy without truncation or padding: the whole text is one long encoding.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    ids = np.asarray(tok.encode(documentation_text(), add_special_tokens=False).ids, np.int32)
    body = length - 2
    n = len(ids) // body
    chunks = np.empty((n, length), np.int32)
    chunks[:, 0], chunks[:, -1] = CLS, SEP
    chunks[:, 1:-1] = ids[: n * body].reshape(n, body)
    return chunks


def split_chunks(chunks: np.ndarray, calibration: int, seed: int = 0):
    """``(calibration_chunks, finetune_chunks)``: ``calibration`` chunks drawn by a
    fixed shuffle, and all the others (disjoint) for fine-tuning."""
    if not 0 < calibration < len(chunks):
        raise ValueError(f"calibration={calibration} chunks out of {len(chunks)} available")
    order = np.random.default_rng(seed).permutation(len(chunks))
    return chunks[np.sort(order[:calibration])], chunks[np.sort(order[calibration:])]


def common_words(tokenizer, first: int = 1996, last: int = 20000):
    """``(ids, probabilities)``: the alphabetic whole-word tokens with ids in
    ``[first, last)`` (1996 is "the", the first word of the uncased BERT vocabulary,
    whose words follow their frequency in general English), weighted by Zipf's law
    (``1 / rank``), for drawing word sequences with an everyday vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = np.sort(
        np.asarray([i for t, i in vocab.items() if first <= i < last and t.isalpha()], np.int32)
    )
    if len(ids) == 0:
        raise ValueError(f"no whole-word token with an id in [{first}, {last})")
    weights = 1.0 / np.arange(1, len(ids) + 1)
    return ids, weights / weights.sum()


#: Everyday sentences for evaluation, never used to calibrate or fine-tune.
HELD_OUT: tuple[str, ...] = (
    # weather
    "The weather is lovely today.",
    "It's so sunny outside!",
    "Dark clouds are gathering over the hills.",
    "We got caught in a heavy downpour on the way home.",
    "It has been raining all week and the garden is flooded.",
    "Snow is expected tonight, so drive carefully.",
    "A cold wind blew in from the north this morning.",
    # food and cooking
    "I made pancakes with blueberries for breakfast.",
    "She baked a chocolate cake for her brother's birthday.",
    "This soup needs a little more salt.",
    "We ordered pizza because nobody wanted to cook.",
    "The restaurant on the corner serves excellent noodles.",
    "He always drinks two cups of coffee before work.",
    "Fresh bread from the bakery smells wonderful.",
    # sport
    "He drove to the stadium.",
    "Our team won the football match in the last minute.",
    "She runs five kilometres every morning before breakfast.",
    "The tennis final was postponed because of rain.",
    "The fans cheered loudly when the goal was scored.",
    "He injured his knee during basketball practice.",
    # travel and transport
    "The train to London was delayed by forty minutes.",
    "We missed our flight and had to wait at the airport overnight.",
    "She cycles to the office when the weather is nice.",
    "The bus was so crowded that I had to stand.",
    "They are planning a road trip along the coast this summer.",
    "Our hotel room had a beautiful view of the sea.",
    "Traffic on the motorway was terrible this evening.",
    # animals
    "The cat is sleeping on the windowsill.",
    "My dog loves chasing the ball in the park.",
    "A small bird built a nest in our hedge.",
    "The children fed the ducks at the pond.",
    "Our neighbour's puppy barks at every passing car.",
    "Horses were grazing quietly in the field.",
    # work and school
    "I have an important meeting with my manager tomorrow.",
    "She finally finished writing her thesis.",
    "The teacher gave us a lot of homework for the weekend.",
    "He was promoted after five years at the company.",
    "Our office is moving to a bigger building next month.",
    "The students are preparing for their final exams.",
    "I forgot to send the report before the deadline.",
    # home and family
    "My grandmother tells the best stories.",
    "We painted the kitchen a bright shade of yellow.",
    "The washing machine broke down again.",
    "The kids built a fort out of blankets and pillows.",
    "My sister is getting married in June.",
    "Could you please take out the rubbish tonight?",
    "The baby finally fell asleep after midnight.",
    # health
    "I have had a headache since this morning.",
    "The doctor told him to get more rest.",
    "Drinking enough water is important on hot days.",
    "She goes to yoga classes twice a week.",
    "He caught a cold after walking home in the rain.",
    # shopping and money
    "These shoes were on sale for half the price.",
    "I need to buy milk, eggs and bread at the supermarket.",
    "The new phone is far too expensive for me.",
    "They are saving money to buy a house.",
    "The shop closes early on Sundays.",
    # music, films, hobbies
    "We watched an old comedy film last night.",
    "He plays the guitar in a small jazz band.",
    "She is reading a mystery novel about a stolen painting.",
    "The concert was sold out within an hour.",
    "I started learning to knit during the winter.",
    "They spent the afternoon painting landscapes by the river.",
    # feelings and conversation
    "I'm really sorry I missed your party.",
    "Thank you so much for your help yesterday.",
    "She was thrilled to hear the good news.",
    "He felt nervous before giving his speech.",
    "Let's meet for lunch sometime next week.",
    "I can't believe how quickly this year has gone by.",
    # technology and everyday objects
    "My laptop battery dies after only an hour.",
    "The internet connection keeps dropping this evening.",
    "I lost my keys somewhere in the house.",
    "Please charge your phone before the trip.",
    # near-paraphrases of earlier sentences
    "The sun is shining and it is warm outside.",
    "A storm is coming; the sky is getting dark.",
    "The kitten is napping by the window.",
    "Our football team scored a late winner.",
    "The flight was cancelled, so we slept at the airport.",
    "My head has been hurting all day.",
    "I misplaced my house keys again.",
    "We had pizza delivered since nobody felt like cooking.",
)
