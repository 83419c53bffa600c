"""What the node schemas cannot say: when to use each PerRes node, the paper's defaults, an example and
its common errors. tools/make_docs.py joins this text with the schemas (display name, description,
inputs, outputs, tooltips) into the help pages web/docs/<NodeId>.md and the node reference docs/nodes.md.
Edit the text here, then run the script; never edit the generated pages by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeHelp:
    when: str                      # when to use the node, and what it does beyond its description
    paper: str = ""                # the paper's defaults that concern this node ("" when none)
    example: str = ""              # a short example workflow or setting
    errors: list[tuple[str, str]] = field(default_factory=list)  # (message, fix); messages shortened with …
    type_labels: dict[str, str] = field(default_factory=dict)    # input -> type shown instead of the schema's


HELP: dict[str, NodeHelp] = {
    "PerResLoadConceptImages": NodeHelp(
        when="Use it first when training: its batch goes to PerRes Train Residuals. It reads `.png .jpg .jpeg "
             ".webp .bmp` files. If ComfyUI's input directory has no folder of that name, the pack's bundled "
             "`example_images/` is searched (that is how `perres_example` is found). Paths that leave these "
             "directories are refused. With `crop` `buckets` each photo keeps its aspect ratio at about "
             "resolution² pixels (sides multiples of 64), and the node shows the buckets, e.g. `3 × 448×576, "
             "2 × 512×512`. Set PerRes Train Residuals' `crop` to `buckets` too, or it centre-crops them again "
             "(docs/non-square-photos.md). `masks` holds each image's "
             "alpha channel after the same crop, for training with subject masks: 1 where the image is opaque "
             "(the subject of a cut-out), 0 where it is transparent, and 1 everywhere for images without alpha. "
             "That is the polarity PerRes Train Residuals' `masks` expects, and the inverse of the stock Load "
             "Image's mask (1 = transparent).",
        paper="512 px for SD1.x, centre-cropped (`crop` `center`). The paper trains on the 3–15 photos per "
              "concept of CustomConcept101.",
        example="Put 3–20 photos of your dog in `ComfyUI/input/my_dog/`, set `folder` to `my_dog`, and connect "
                "`images` to PerRes Train Residuals. For cut-outs (PNGs with a transparent background) also "
                "connect `masks`; see `perres_train_with_masks`. For portrait or landscape photos set `crop` to "
                "`buckets` here and in PerRes Train Residuals.",
        errors=[
            ("folder '…' does not exist in ComfyUI's input directory", "Put the photos in a folder under "
             "`ComfyUI/input` and give its relative name, e.g. `perres/dog`."),
            ("folder '…' has no images (.png, .jpg, .jpeg, .webp, .bmp)", "Add photos in one of these formats."),
            ("'….png' is only 40×30 px; reference images must be at least 64 px on each side",
             "Replace the image with a larger photo, or remove it."),
            ("*warning* only one reference image in '…'; 3 or more generalise much better",
             "Training works, but add more photos for better results. The warning is shown on the node."),
        ],
    ),
    "PerResSuggestClassWord": NodeHelp(
        when="Use it before training when you are unsure which class word to use (the paper: 'our approach can "
             "be sensitive to the choice of macro class'). It scores 'a photo of a <word>' for each candidate with "
             "the frozen model's own noise-prediction error on your images, at the same timesteps and noise for "
             "every word (a diffusion classifier, Li et al. 2023): all words are screened with a quarter of the "
             "budget, the best 5 get the rest. The ranking is shown on the node; wire `class_word` into PerRes "
             "Train Residuals' `class_word` input, or read the ranking and type the word you prefer. A warning "
             "says when the first two are too close to call.",
        example="PerRes Load Concept Images → PerRes Suggest Class Word (default candidates) → its `class_word` "
                "into PerRes Train Residuals. See `perres_suggest_class_word`.",
        errors=[
            ("the candidate list is empty", "Give class words separated by commas or new lines."),
            ("'…' is not a word", "A candidate is one to three words of letters; no digits, weights or captions."),
            ("'…' is listed twice", "Remove the duplicate."),
            ("no reference images were given", "Connect the images you will train on."),
            ("*warning* '…' and '…' are within two standard errors of each other", "Raise the budget, or pick the "
             "word that describes the concept."),
        ],
    ),
    "PerResTrainResiduals": NodeHelp(
        when="Use it to teach the model a new concept from 3–20 photos. The input model is never modified: "
             "the `model` output is a patched copy, ready for sampling. The node reports progress and can be "
             "cancelled. Save the `residuals` output with PerRes Save Residuals to use the concept again.\n\n"
             "**Model families.** The family comes from the model ComfyUI loaded, never from a setting: "
             "SD1.x (16 proj_out 1×1 convs, 1.24 M residual parameters), SDXL and its descendants — Pony, "
             "Illustrious, NoobAI — (11 Linear proj_out layers, 1.19 M), Anima (84 block output layers, 3.10 M) "
             "and Krea 2 (56, 18.5 M); on the DiTs the rank keeps the paper's share of the model "
             "(docs/model-families.md). On SDXL the UNet is also conditioned on "
             "the pooled text embedding and the image size; the node builds that vector with the host model's "
             "own `encode_adm`, for an uncropped image of the training size (each bucket's with `crop` "
             "`buckets`); on Anima and Krea 2 the host model's own extra_conds makes the conditioning. `resolution` 0 "
             "(the default) trains at the family's own size, 512 px for SD1.x and 1024 px for the others; a much "
             "lower one gets a warning on the node. The loss is taken in what the "
             "model predicts, read from its sampling "
             "(model_sampling): ε for most checkpoints (paper Eq. 1), v for v-prediction ones such as NoobAI "
             "v-pred, zero-terminal SNR included when the checkpoint (or a ModelSamplingDiscrete node with "
             "`zsnr`) says so; the velocity of the rectified-flow DiTs, at the noise levels of their flow schedule "
             "(shift included). EDM, x0 and other models are refused. Anima and Krea 2 train on fp8 weights "
             "(`weight_dtype` fp8_e4m3fn) with fp32 residual factors. A text encoder or VAE of another family "
             "is refused by name.\n\n"
             "**Subject masks.** Photos have backgrounds that the residual would learn too. Connect `masks` "
             "(1 on the concept, 0 on the background, one per image in the images' order, or one for all) and "
             "each latent location's loss is weighted by the share of its 8×8 pixels the mask covers: the subject "
             "counts 1, the background `background_weight`. The masks are cropped and resized exactly like the "
             "images; a mask of another size than its image must have the image's aspect ratio. Masks come from "
             "PerRes Load Concept Images (the alpha of cut-outs) or any masking node; the stock Load Image's "
             "mask is 1 where a file is transparent, so turn on `invert_masks` for it (or use Invert Mask). "
             "Without masks, or with `background_weight` 1, the loss is the paper's, bit for bit.\n\n"
             "**Continuing a run.** Connect PerRes Load Residuals to `initial_residuals` and training starts from "
             "that residual instead of a fresh initialization (`init` is unused); `steps` more steps are "
             "trained. The residual must have the ranks that `rank_ratio` gives (keep the first run's), and "
             "should carry the same identifier and class word (a warning says otherwise). The loaded residual "
             "and its file are never changed; the result records the total steps (`perres.steps`) and "
             "`perres.continued_from_steps`. With the same seed, the continuation skips the random draws of the "
             "steps already done, so it sees the batches, timesteps and noise that one long run would see next "
             "(with the same images and batch size), not the first run's again. AdamW's moment estimates are "
             "not saved in the file, so the continuation restarts them: 150 + 150 steps come close to one "
             "300-step run but are not identical to it.\n\n"
             "**Watching a run.** Every `preview_every` steps (and at the first and the last) the node shows the "
             "model's reconstruction of the first reference image from one fixed noisy version of it (60 % "
             "through the schedule, the same noise every time), so successive previews differ only by what the "
             "residual has learned: a blur of the layout at first, then the concept. It is decoded by ComfyUI's "
             "own previewer with its preview method (none, latent2rgb or taesd). ComfyUI's default is none: start "
             "it with `--preview-method auto`, or on ComfyUI 0.33.0 pick Settings → Comfy → Execution → Live "
             "preview method. `preview_every` 0 turns the preview off for this node. The text line under it "
             "gives the step, the loss smoothed over about 10 steps, the time left "
             "and the last snapshot.\n\n"
             "**Snapshots.** `snapshot_every` N also saves the residual every N steps, as "
             "`models/loras/<snapshot_prefix>_step00050_00001.safetensors` and so on (new files, never "
             "overwriting; PerRes Load Residuals lists them). The `snapshots` output lists every snapshot, then "
             "the final residual, so an Apply Residuals → KSampler with one seed connected to it renders every "
             "step (`perres_compare_snapshots`). A cancelled or failed run keeps the snapshots it wrote and "
             "names them.\n\n"
             "**Photos that are not square.** `crop` `buckets` trains each photo at its own aspect ratio (about "
             "resolution² pixels, sides multiples of 64, at most 4:1) instead of the centre-cropped square. "
             "Each step's batch comes from one bucket, masks follow their images, and SDXL's size conditioning "
             "takes each bucket's size. `images` may be a list of batches or of images of any sizes (PerRes Load "
             "Concept Images with `crop` `buckets`, ComfyUI 0.33.0's Load Image (from Folder)). With only "
             "square photos the result is the centre crop's. docs/training-runs.md and "
             "docs/non-square-photos.md have the details.",
        paper="150 steps, batch size 4, learning rate 0.001, rank ratio 0.05 (1.24 M parameters), random "
              "initialization, 512 px, caption 'a photo of a sks dog' (about 3 minutes on one A100). The paper "
              "covers SD1.x only; on SDXL, Anima and Krea 2 PerRes keeps these settings at 1024 px (on the "
              "DiTs rank_ratio 0.05 is the paper's share of the model, not r = 0.05·m).",
        example="Load Checkpoint (SD1.5) → PerRes Load Concept Images → PerRes Train Residuals (`identifier` "
                "`sks`, `class_word` `dog`) → PerRes Save Residuals. Then prompt 'a sks dog in the snow'. "
                "For SDXL, Pony, Illustrious or NoobAI the chain is the same: see `perres_sdxl_train_and_sample`. "
                "Anima and Krea 2 load as three files (Load Diffusion Model, Load CLIP, Load VAE): see "
                "`perres_anima_train_and_sample` and `perres_krea2_train_and_sample` (trains on Krea 2 RAW, "
                "samples with Turbo). "
                "See the example workflows `perres_train_and_sample`, `perres_train_with_masks` (RGBA cut-outs "
                "with subject masks), `perres_continue_training` (PerRes Load Residuals → "
                "`initial_residuals`) and `perres_compare_snapshots` (`snapshot_every` 50: steps 50, 100 and "
                "150 sampled with one seed).",
        errors=[
            ("the model is Flux …; PerRes supports SD1.x (…); SDXL (…); Anima (…); Krea 2 (…)", "Load a model of a "
             "supported family: an SD1.x or SDXL-family checkpoint with Load Checkpoint, or Anima or Krea 2 with "
             "Load Diffusion Model."),
            ("the model samples with ModelSamplingContinuousEDM/EDM; PerRes trains ε-prediction and "
             "v-prediction models …", "Train on the ε- or v-prediction checkpoint of the family, or set a "
             "ModelSampling node in front of the trainer to eps or v_prediction."),
            ("*warning* training SDXL at 512 px; SDXL models are trained at 1024 px …", "Set `resolution` to 0 "
             "(1024 px) unless memory is short; keep `gradient_checkpointing` on."),
            ("initial_residuals was trained on an SD1.x model, but this model is SDXL", "Continue a residual on "
             "the family it was trained on, or disconnect `initial_residuals`."),
            ("identifier 'sks toy' has spaces; the identifier must be one rare word such as 'sks'",
             "Use one word. The class word may have several words."),
            ("learning_rate must be a positive finite number", "Set a learning rate > 0 (paper: 0.001)."),
            ("*warning* identifier '…' is split into several tokens", "Training works, but a rare single-token "
             "word such as `sks` binds the concept more cleanly."),
            ("*warning* N image(s) for batch size B; batches are drawn with replacement",
             "Training works. Lower batch_size or add photos if you like."),
            ("3 masks for 5 images; give one mask per image, or one for all", "Connect masks made from the same "
             "images, in the same order (PerRes Load Concept Images' `masks`)."),
            ("mask 2 is 64×64 px but its image 768×512 px", "Make the masks from the images that go into "
             "`images`, or resize both together."),
            ("mask 2 marks (almost) no pixel as the subject … turn on invert_masks",
             "The mask is empty, or marks the background. Fix the mask, or turn on `invert_masks` for masks that "
             "are 1 on the background."),
            ("*warning* one mask for 5 images; it weights every image the same way", "Fine for a fixed framing; "
             "otherwise give one mask per image."),
            ("initial_residuals layer input_blocks.1.1.proj_out has rank 32, but rank_ratio 0.05 gives rank 16",
             "Set `rank_ratio` to the residual's (the message gives it), or disconnect `initial_residuals`."),
            ("*warning* initial_residuals were trained as 'sks dog'; this run trains 'olis cat'",
             "Use the residual's identifier and class word to continue the same concept."),
            ("out of memory on cuda:0 while training at 512 px with batch_size 4 …",
             "Nothing was saved and the model is unchanged. Turn on `gradient_checkpointing` (the default), lower "
             "`batch_size` or `resolution`, or close other programs that use the GPU. The README's Hardware "
             "table says what fits on which card."),
            ("snapshot_prefix '…' contains '..' (before training starts)",
             "Give `snapshot_prefix` as a path under models/loras, e.g. `perres/snapshots/my_dog`."),
            ("… Only the snapshots survive the failure: the 2 snapshot(s) written before it are kept: "
             "models/loras/…", "Fix what the first part of the message says. The snapshots are complete "
             "residuals: sample them with PerRes Load Residuals, or continue from the last one."),
            ("*on the node after Cancel* Cancelled: the 2 snapshot(s) written before it are kept: …",
             "Nothing else was saved. To go on, connect the last snapshot to `initial_residuals` with the same "
             "seed and the missing steps."),
        ],
    ),
    "PerResSaveResiduals": NodeHelp(
        when="Use it after PerRes Train Residuals to keep the concept. A1111/Forge and model sites read the "
             "file as an SD1 or SDXL LoRA too (kohya keys, `ss_base_model_version` and `modelspec.architecture` of "
             "the family the residual was trained on), and its metadata (`modelspec.trigger_phrase`) carries "
             "the trigger words, "
             "the identifier and class word. This is an output node.",
        example="`filename_prefix` `perres/my_dog` writes `models/loras/perres/my_dog_00001.safetensors`.",
        errors=[
            ("filename_prefix '…' contains '..'", "Give a path relative to models/loras, without `..` or an "
             "absolute path."),
            ("could not write '…' (…); nothing was saved", "Free disk space or fix the folder's permissions."),
        ],
    ),
    "PerResLoadResiduals": NodeHelp(
        when="Use it to sample with a concept trained earlier. The list shows only files whose header carries "
             "PerRes metadata, so ordinary LoRAs do not crowd it; press R (refresh) after adding files. The "
             "file is checked when loaded: `.safetensors` only (pickles are never opened), the layer shapes of "
             "its model family and finite values. After loading, the node shows the family the residual was "
             "trained on (SD1.x, SDXL, Anima or Krea 2), its words and its steps; it only fits models of that "
             "family, any checkpoint of it. Load "
             "ordinary LoRAs with the stock LoraLoader.",
        example="PerRes Load Residuals (`perres/robot_00001.safetensors`) → PerRes LAG Sampling or PerRes Apply "
                "Residuals.",
        errors=[
            ("'…' is an ordinary LoRA, not a PerRes residual", "Load ordinary LoRAs with ComfyUI's LoraLoader."),
            ("'…' is not in models/loras; refresh the node list or re-save it", "Refresh the node list (press R) "
             "after adding files."),
            ("uses PerRes file format '…'", "The file comes from a newer PerRes. Update the pack."),
        ],
        type_labels={"residual_name": "file list"},
    ),
    "PerResApplyResiduals": NodeHelp(
        when="Use it for the paper's \"normal sampling\", the residual everywhere. Prefer it to LAG for prompts "
             "that change the concept itself: artistic styles (\"a watercolor painting of a sks dog\"), changed "
             "attributes (\"a red sks chair\").",
        paper="strength 1 (the residual as trained); DDIM, 50 steps, guidance 6.0 in the sampler.",
        example="PerRes Load Residuals → PerRes Apply Residuals → KSampler with 'a watercolor painting of a sks "
                "dog'. See `perres_load_and_apply`.",
        errors=[
            ("the residual was trained on an SD1.x model, but this model is SDXL", "Use the checkpoint family the "
             "residual was trained on (Load Residuals shows it), or a residual trained on this family."),
            ("the model is Flux …; PerRes supports SD1.x (…); SDXL (…); Anima (…); Krea 2 (…)",
             "Use a model of one of these families."),
        ],
    ),
    "PerResLAGSampling": NodeHelp(
        when="Use it when the concept should stay as it is and the rest of the image should change: new "
             "backgrounds, added objects, identity preservation. The residual no longer pulls the background "
             "towards the training photos. Add more concepts with PerRes LAG Concept, and any LoRA of the model's "
             "family with PerRes LAG LoRA (then `residuals` may stay unconnected). Works on SD1.x; on SDXL, "
             "Pony, Illustrious and NoobAI, where each of a transformer's 2 or 10 cross-attentions makes its own "
             "mask and the residual's mask comes from all of them (`perres_sdxl_lag_sampling`); and on Anima and "
             "Krea 2, with the masks from each block's text attention.",
        paper="threshold `median` (the upper half of each attention map), strength 1, LAG at every step "
              "(start 0, end 1); DDIM, 50 steps, guidance 6.0 in the sampler.",
        example="PerRes Load Residuals → PerRes LAG Sampling (prompt 'a photo of a sks dog on a mossy rock in a "
                "forest') → KSampler (model and positive from this node) → VAE Decode. See "
                "`perres_lag_sampling` and `perres_normal_vs_lag`.",
        errors=[
            ("prompt is empty; write the prompt with the concept words", "Write a prompt that contains the "
             "identifier and class word, e.g. 'a photo of a sks dog'."),
            ("start_percent (…) is after end_percent (…)", "Set start_percent ≤ end_percent."),
            ("no concept is connected", "Connect `residuals` or `extra_concepts`."),
            ("the residual for '…' was trained on an SD1.x model, but this model is SDXL", "Residuals fit only the "
             "family they were trained on: use a residual trained on SDXL, or load an SD1.x checkpoint."),
            ("LoRA '…' is a Krea 2 LoRA (its layer names are Krea 2's, …), but this model is Anima", "A LoRA fits "
             "only the family it was trained on: pick a LoRA of the model's family."),
            ("*warning* 'sks', 'dog' not in the prompt. None of its words occur, so this concept is applied "
             "everywhere", "Add the identifier and class word to the prompt, or set concept_words to words "
             "that the prompt contains. The warning is shown on the node."),
        ],
    ),
    "PerResLAGConcept": NodeHelp(
        when="Use it for two or more concepts in one image. Where two concepts claim the same place, the one "
             "whose words attend there more than they do on average wins. Chain several nodes through `concepts` "
             "and connect the last one to "
             "PerRes LAG Sampling's `extra_concepts`. Train each concept with its own identifier.",
        example="Residuals trained as 'sks dog' and 'olis cat': PerRes LAG Sampling gets the dog, a PerRes LAG "
                "Concept gets the cat, and the prompt is 'a photo of a sks dog and an olis cat on a beach'. "
                "See `perres_two_concepts_lag`.",
        errors=[
            ("… '(sks:1.2)' contains prompt syntax characters such as ( ) [ ] :", "Give the plain words; put "
             "weights in the prompt."),
        ],
    ),
    "PerResLAGLoRA": NodeHelp(
        when="Use it to keep an ordinary LoRA of the model's family (SD1.x, the SDXL family, Anima or Krea 2: a "
             "character, an object, a style) to the part of the image "
             "its trigger words describe: two character LoRAs in one prompt stay apart, and the background "
             "stays the base model's. Chain one node per LoRA through `concepts` into PerRes LAG Sampling's "
             "`extra_concepts`; PerRes residuals and LoRAs mix in one chain. Only the LoRA's UNet part is "
             "applied (like LoraLoaderModelOnly): the text-encoder part is not tied to image locations; add it "
             "with a stock LoRA loader's strength_clip if you want it. Layers that run before a block's "
             "cross-attention use that block's mask from the previous step, and in the first call of a run an "
             "estimate from the block's own query projection. On SDXL each of a transformer's 2 or 10 blocks "
             "makes its own mask; SDXL's "
             "label_emb (the pooled-text and size vector) has no image locations and stays the base model's. "
             "README, 'LAG for any LoRA', has the limits; docs/lag-internals.md the rule of each layer.",
        example="Two PerRes LAG LoRA nodes (character_a.safetensors with 'ohwx, woman', character_b.safetensors "
                "with 'zkz, man') → PerRes LAG Sampling (prompt 'a photo of ohwx woman and zkz man sitting on a "
                "park bench') → KSampler. See `perres_lag_lora`, and `perres_sdxl_lag_lora` for SDXL.",
        errors=[
            ("trigger_words is empty", "Write the LoRA's trigger words, comma-separated, as in the prompt."),
            ("'…' is not a .safetensors file", "PerRes reads only safetensors; convert the LoRA or pick another."),
            ("LoRA '…' is an SD1.x LoRA (its cross-attention reads 768-wide text), but this model is SDXL",
             "LoRAs fit only the family they were trained on (also the other way round); pick a LoRA for the "
             "model's family."),
            ("LoRA '…' changes no layer of this SD1.x UNet", "The LoRA is for another model family (SD2, Flux, "
             "...) or only trains the text encoder; use a LoRA of the model's family that trains the UNet."),
            ("*warning* its text-encoder part is not applied", "Shown on PerRes LAG Sampling; add the LoRA to the "
             "CLIP with a stock loader if you need its text-encoder part."),
        ],
        type_labels={"lora_name": "file list"},
    ),
    "PerResLAGMaskPreview": NodeHelp(
        when="Use it to see where LAG applied each residual. Concept 4 is yellow and 5 purple; brightness is "
             "the share of steps in which the residual was active. This is an output node, and it re-runs with "
             "every sampling run.",
        example="Connect PerRes LAG Sampling's `model` and the KSampler's `LATENT` output.",
        errors=[
            ("the model does not come from PerRes LAG Sampling", "Connect that node's model output."),
            ("no masks were recorded", "Connect this node after a sampler that used the LAG model."),
        ],
    ),
}
