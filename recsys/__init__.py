"""recsys: deep-learning recommender experiments on Lightning, Hydra and TorchRec."""

import logging

from recsys import config  # noqa: F401  (registers the OmegaConf resolvers conf/ uses)

# fbgemm_gpu logs a dozen "Successfully loaded" lines on the root logger at import time, and
# torch.fx warns about is_fx_tracing on every KeyedJaggedTensor split; neither helps a user.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
logging.disable(logging.INFO)
try:
    import torchrec  # noqa: F401
finally:
    logging.disable(logging.NOTSET)
