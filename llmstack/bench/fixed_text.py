"""The `fixed` dataset's long prompt: plain English of our own, as long as any context needs.

The seed benchmark cut one long English prompt to `input_length` tokens, so every request sends the same
text. This is llmstack's own text for that purpose: a handful of paragraphs, repeated as numbered chapters
until the prompt is long enough. Only its length matters; a model's answer to it is never judged.
"""

from __future__ import annotations

__all__ = ["PARAGRAPHS", "fixed_text"]

PARAGRAPHS: tuple[str, ...] = (
    "The ferry left the northern quay an hour before sunrise, when the harbour lights were still burning "
    "and the water looked like polished slate. Mara stood at the rail with a canvas bag at her feet and "
    "watched the town shrink into a row of pale roofs. She had crossed the strait many times as a child, "
    "but never alone, and never with a letter in her pocket that she had not yet dared to open.",
    "On the lower deck a group of fishermen argued about the weather in low, patient voices. One of them "
    "insisted that the wind would turn by noon; another said that it had not turned on a Tuesday in forty "
    "years and would not start now. Nobody laughed, because everyone on board knew that the sea keeps its "
    "own calendar and does not care what the almanac promises.",
    "Halfway across, the engine coughed twice and settled into a slower rhythm. The captain, a broad man "
    "with a grey beard and a voice like gravel in a bucket, came out of the wheelhouse, looked at the sky, "
    "looked at the water, and went back inside without a word. Mara took this as a good sign. In her "
    "experience, captains who talked a great deal were the ones who worried.",
    "She finally unfolded the letter when the island appeared on the horizon, a dark line under a band of "
    "copper light. The handwriting was her grandmother's, small and careful, every line slanting a little "
    "to the right as if hurrying toward the end of the page. It said that the orchard had survived another "
    "winter, that the well needed a new rope, and that there was something in the attic she ought to see.",
    "The island had one road, one shop, one school with eleven pupils, and a lighthouse that had not been "
    "lit since the automatic beacon was installed on the reef. People there measured distance in minutes "
    "of walking and time in tides. When Mara stepped off the ferry, the woman who ran the shop was already "
    "waiting with a bicycle, because news of an arrival always travelled faster than the arrival itself.",
    "Her grandmother's house stood at the end of a lane lined with stone walls and wild fennel. The door "
    "was unlocked, as every door on the island was, and the kitchen smelled of woodsmoke, apples and the "
    "faint sweetness of old paper. A kettle sat on the stove. A note beside it said, in the same careful "
    "handwriting, that the attic key was under the blue bowl and that supper would be at seven.",
    "The attic was low and warm, lit by a single round window that faced the sea. Under a sheet lay a "
    "wooden chest bound with brass, and inside it, wrapped in oilcloth, were dozens of notebooks filled "
    "with measurements: the height of every tide, the direction of every wind, the date the swallows came "
    "back each spring and the date they left, recorded without a single gap for more than fifty years.",
    "At supper her grandmother explained that the notebooks had begun as a game between two sisters and "
    "had become, over the decades, something closer to a duty. Scientists from the mainland had visited "
    "twice to copy them. What they wanted, she said, was not the numbers themselves but the patience that "
    "had produced them, and patience, unlike numbers, could not be copied into another book.",
    "That night the wind did turn, a little after midnight, exactly as the first fisherman had said. Mara "
    "lay awake listening to it work its way around the house, testing the shutters one by one. In the "
    "morning she climbed to the attic, opened the newest notebook to its first empty page, and wrote the "
    "date, the height of the morning tide, and the direction of the wind, in handwriting that slanted, "
    "just slightly, to the right.",
)


def fixed_text(min_words: int) -> str:
    """At least `min_words` words of the text (whole paragraphs), always starting at the same place."""
    parts: list[str] = []
    words = 0
    chapter = 1
    while words < min_words:
        heading = f"Chapter {chapter}."
        parts.append(heading)
        words += 2
        for paragraph in PARAGRAPHS:
            parts.append(paragraph)
            words += paragraph.count(" ") + 1
        chapter += 1
    return "\n\n".join(parts)
