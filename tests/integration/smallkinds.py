"""Each tokenizer kind at 32 px and a few thousand weights (4 x 4 tokens an image), as
`--set <kind>.<key>=<value>` overrides: what the integration tests train in seconds."""

SMALL = {
    "mingtok": {"image_size": 32, "patch_size": 8, "latent_dim": 8, "enc_width": 32, "enc_heads": 2,
                "enc_depth": 1, "sem_width": 32, "sem_heads": 2, "sem_depth": 1, "pix_width": 32,
                "pix_heads": 2, "pix_depth": 1, "pix_patch_size": 4},
    "unitok": {"image_size": 32, "patch_size": 8, "enc_width": 32, "enc_depth": 1, "enc_heads": 2,
               "dec_width": 32, "dec_depth": 1, "dec_heads": 2, "proj_heads": 2, "code_dim": 16,
               "num_codebooks": 4, "codebook_size": 16, "restart_after": 1},
    "tuna": {"image_size": 32, "vae_patch_size": 8, "latent_channels": 4, "vae_width": 32, "vae_depth": 1,
             "vae_heads": 2, "rep_patch_size": 1, "rep_width": 32, "rep_depth": 1, "rep_heads": 2,
             "head_depth": 1, "head_heads": 2},
}  # fmt: skip
