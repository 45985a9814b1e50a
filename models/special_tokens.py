"""Special tokens of the unified sequence format. The byte-level BPE the data pipeline
trains reserves them first, in this order, so their ids are fixed: 0..len-1."""

PAD = "<|pad|>"
EOS = "<|eos|>"
HUMAN = "<|human|>"
ASSISTANT = "<|assistant|>"
IMAGE_START = "<|image_start|>"
IMAGE_PATCH = "<|image_patch|>"
IMAGE_END = "<|image_end|>"

SPECIAL_TOKENS = (PAD, EOS, HUMAN, ASSISTANT, IMAGE_START, IMAGE_PATCH, IMAGE_END)
SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
