"""WD-DS: entropy-discrepancy selection of the active training set (docs/design.md section 1.2).

Three steps, each usable on its own:

1. ``score_dataset(strong_model, weak_model, dataset)`` -> ``DatasetScores``: for every example
   ``i``, ``H_strong_i`` and ``H_weak_i``, the mean over ``i``'s supervised target tokens of each
   model's next-token entropy under teacher forcing (nats). The entropies come from
   ``wmss.token_entropy`` on the models' final hidden states: the ``[tokens, vocab]`` logits are
   never built. Optionally checkpointed to a file and resumed (see ``score_dataset``).
2. ``sampling_weights(H_strong, H_weak)`` -> ``p`` (float64, sums to 1), the paper's Eq. 9:
   ``p_i ∝ alpha * [-dH_i]_+ + beta * H_strong_i + gamma * [dH_i]_+`` with
   ``dH_i = H_strong_i - H_weak_i``.
3. ``draw_active(p)`` -> the active set: ``|D|`` draws with replacement from ``p``, duplicates
   dropped (or kept, the authors' variant: an example drawn k times is trained k times), sorted.

``select_active(scores, SelectionOptions(...))`` runs steps 2 and 3 with one validated set of
options and ``save_selection`` writes the result (``ACTIVE_FILE``, ``SUMMARY_FILE``); both
``wmss select`` and the pipeline (``wmss train``) use them, so the two cannot drift apart.

What the three terms mean: ``[-dH]_+`` is large where the weak model is more uncertain than the
strong one (what the strong model has learned since), ``H_strong`` where the strong model itself
is uncertain (hard examples), ``[dH]_+`` where the strong model is more uncertain than the weak one
(regressions). ``weight_terms`` returns each term's part of the weight and ``summarize`` its share
of the total, for reports.

An example without any supervised target (everything masked, or a single token) has no entropy to
average: it scores ``H = 0`` with ``tokens = 0``, hence weight 0 under the paper's formula (all
three terms vanish), and is never drawn.

The package, one module per job: ``weights`` (Eq. 9 and the draws), ``flow`` (the options, the
active set and its files, the summary), ``scores_file`` (``DatasetScores`` and its format),
``catalog`` (checking and fingerprinting the data set), ``signatures`` (the models' signatures and
resuming an output file), ``scoring`` (``score_dataset``). Every public name is here.
"""

# The constants are re-exported to be read. One a module uses (e.g. HASH_CHUNK_BYTES) is looked up
# in that module (wmss.recipe.selection.signatures), so that is where a test must set it.
from .catalog import dataset_fingerprint
from .flow import (ACTIVE_FILE, SCORES_FILE, SUMMARY_FILE, Selection, SelectionOptions,
                   save_selection, select_active, summarize)
from .scores_file import FORMAT_VERSION, READABLE_VERSIONS, SCORES_FORMAT, DatasetScores
from .scoring import SAVE_INTERVAL, score_dataset
from .signatures import HASH_CHUNK_BYTES, check_scores_output
from .weights import (ENTROPY_TERMS, MAX_DRAWS, MAX_KEPT_DRAWS, NORMALIZATIONS, SEED_LIMIT, TERMS,
                      draw_active, sampling_weights, weight_terms)

__all__ = [
    "ACTIVE_FILE",
    "DatasetScores",
    "SCORES_FILE",
    "SUMMARY_FILE",
    "Selection",
    "SelectionOptions",
    "check_scores_output",
    "dataset_fingerprint",
    "draw_active",
    "sampling_weights",
    "save_selection",
    "score_dataset",
    "select_active",
    "summarize",
    "weight_terms",
]
