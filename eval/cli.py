"""eval's sub-commands of the ``fixative`` command (entry point ``fixative.commands: eval``).

``fixative metrics fid|kid|clip-score|lpips|ssim|psnr`` over image folders, each printing one JSON object: the
value and what produced it; ``fixative mimic``, the mimicry attack; ``fixative toy report``, the toy world's
measurements. Heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    metrics = subparsers.add_parser(
        "metrics",
        help="FID, KID, CLIP score, LPIPS, SSIM, PSNR over image folders",
        description="Measure image folders; prints one JSON object with the value "
        "and its provenance (extractor, weights and image hashes).",
    )
    commands = metrics.add_subparsers(dest="metric", metavar="METRIC", required=True)

    for name, help_text in (
        ("fid", "Fréchet distance between the features of two image folders"),
        ("kid", "kernel (MMD) distance between the features of two image folders"),
    ):
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("real", help="folder of reference images")
        parser.add_argument("fake", help="folder of generated images")
        parser.add_argument(
            "--features",
            default="inception",
            help="inception, or clip:FOLDER (a transformers CLIP folder; clip:toy = the toy CLIP) "
            "(default: %(default)s)",
        )
        parser.add_argument(
            "--inception-weights",
            help="pt_inception-2015-12-05-6726825d.pth (default: looked up in the torch hub cache)",
        )
        parser.add_argument("--cache", help="feature cache folder (default: $FIXATIVE_HOME/eval/features)")
        parser.add_argument(
            "--no-cache", action="store_true", help="neither read nor write cached features (default: use the cache)"
        )
        parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
        if name == "kid":
            parser.add_argument(
                "--subsets", type=int, default=100, help="random subsets averaged (default: %(default)s)"
            )
            parser.add_argument(
                "--subset-size",
                type=int,
                default=1000,
                help="images per subset; at most the smaller folder's count (default: %(default)s)",
            )
        _common(parser)
        parser.set_defaults(func=_distribution)

    clip = commands.add_parser("clip-score", help="CLIP score of images against one prompt each")
    clip.add_argument("images", help="folder of images (file-name order)")
    clip.add_argument("--prompts", required=True, help="text file, one prompt per image in file-name order; required")
    clip.add_argument("--clip", default="toy", help="a transformers CLIP folder, or 'toy' (default: %(default)s)")
    clip.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    _common(clip)
    clip.set_defaults(func=_clip_score)

    for name in ("lpips", "ssim", "psnr"):
        parser = commands.add_parser(name, help=f"{name.upper()} of each image against the same-named reference")
        parser.add_argument("test", help="folder of images to measure")
        parser.add_argument("reference", help="folder of reference images (matched by file name)")
        if name == "lpips":
            parser.add_argument(
                "--lpips-net",
                choices=("alex", "vgg"),
                default="alex",
                help="LPIPS backbone network (default: %(default)s)",
            )
            parser.add_argument("--lpips-weights", help="torchvision's backbone file (default: the torch hub cache)")
            parser.add_argument(
                "--lpips-backbone",
                choices=("pretrained", "random"),
                default="pretrained",
                help="random: an untrained trunk, for testing the mechanics only; recorded in the "
                "output (default: %(default)s)",
            )
        _common(parser)
        parser.set_defaults(func=_paired)

    _register_mimic(subparsers)
    _register_toy_report(subparsers)
    bench = subparsers.add_parser(
        "bench",
        help="run a declarative benchmark (TOML) with cached, resumable stages",
        description="Run the experiment of CONFIG.toml into RUN: results.json, report.md, "
        "report.html. Finished stages are cached by content hash: a run "
        "started again redoes only what was not finished.",
    )
    bench.add_argument(
        "config",
        help="the experiment's TOML file (e.g. benchmarks/toy_guidance.toml), or 'compare' "
        "followed by two run folders (fixative bench compare RUN_A RUN_B)",
    )
    bench.add_argument("runs", nargs="*", help="with 'compare': the two run folders")
    bench.add_argument("--out", help="run folder (created; reused to resume); required to run a config")
    bench.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="protection: run the artists' stages in this many processes at once, sharing torch's threads "
        "(default: %(default)s)",
    )
    bench.add_argument(
        "--stages",
        help="cache the stages in this folder instead of RUN/stages; runs of different configs may share one "
        "(a stage's key is the hash of its inputs) (default: RUN/stages)",
    )
    _common(bench)
    bench.set_defaults(func=_bench, seed=None)


def _bench(args: argparse.Namespace) -> int:
    from fixative.core.errors import FixativeError

    from .bench import bench, compare

    if args.config == "compare":
        if len(args.runs) != 2:
            raise FixativeError("bench compare takes two run folders: fixative bench compare RUN_A RUN_B")
        print(compare(*args.runs))
        return 0
    if args.out is None or args.runs:
        raise FixativeError("give one config and --out: fixative bench CONFIG.toml --out RUN")

    results = bench(
        args.config,
        args.out,
        device=_device(args.device),
        log=(lambda _: None) if args.quiet else (lambda line: print(line, flush=True)),
        seed=args.seed,
        jobs=args.jobs,
        stages_dir=args.stages,
    )
    print(f"report: {args.out}/report.html ({results['seconds']} s; stages: {results['stages']})")
    return 0


def _parts(text: str) -> tuple[str, ...]:
    from .toy_report import PARTS

    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}"
        )
    return parts


def _register_toy_report(subparsers) -> None:
    from fixative.core.toy.cli import toy_commands

    report = toy_commands(subparsers).add_parser("report", help="measure the toy world against its quality targets")
    report.add_argument("--folder", help="a toy build folder (default: the one --model toy uses)")
    report.add_argument(
        "--out", default="outputs/toy_report", help="where report.json and samples.png go (default: %(default)s)"
    )
    report.add_argument(
        "--parts",
        type=_parts,
        default="vae,clip,generation,mimicry",
        help="comma-separated subset of vae, clip, generation, mimicry (default: %(default)s)",
    )
    report.add_argument(
        "--mimic-steps", type=int, default=120, help="fine-tuning steps of the mimicry attack (default: %(default)s)"
    )
    _common(report)
    report.set_defaults(func=_toy_report)


def _toy_report(args: argparse.Namespace) -> int:
    from .toy_report import ReportConfig, report

    parts = args.parts if isinstance(args.parts, tuple) else _parts(args.parts)
    config = ReportConfig(seed=args.seed, mimic_steps=args.mimic_steps)
    report(
        args.folder,
        args.out,
        config,
        device=str(_device(args.device)),
        parts=parts,
        log=(lambda _: None) if args.quiet else print,
    )
    return 0


def _register_mimic(subparsers) -> None:
    mimic = subparsers.add_parser(
        "mimic",
        help="the mimicry attack: fine-tune on an artist's images under a new name, generate, judge",
        description="Fine-tune a copy of the model on an artist's images (optionally changed by adversaries first) "
        "under a new name with prior preservation, generate for that name, classify each generation's "
        "style with a CLIP zero-shot judge; prints the protection rate (share not attributed to the "
        "artist) with its 95%% Wilson interval and writes RUN/results.json.",
    )
    mimic.add_argument("--model", default="toy", help="diffusers folder, single file, or 'toy' (default: %(default)s)")
    mimic.add_argument(
        "--images",
        required=True,
        help="folder of the artist's images (captions from its metadata.jsonl when it has one); required",
    )
    mimic.add_argument("--name", required=True, help="the new name the mimic is trained under; required")
    mimic.add_argument("--out", required=True, help="run folder: results.json and samples/; required")
    mimic.add_argument(
        "--artist",
        help="the protected artist's label among the candidates (default: the "
        "metadata's artist column when it has one value)",
    )
    mimic.add_argument(
        "--method", choices=("full", "lora"), default="full", help="fine-tuning method (default: %(default)s)"
    )
    mimic.add_argument(
        "--adversary",
        action="append",
        default=[],
        help="applied to the images before fine-tuning, in order; repeatable: jpeg:75, noise:0.05, "
        "blur:1.0, resize:0.5, purify:noise=0.05,strength=0.2, impress:steps=100 (default: none)",
    )
    mimic.add_argument("--samples", type=int, default=4, help="generations per prompt, M (default: %(default)s)")
    mimic.add_argument(
        "--prompts",
        help="text file of the K prompts, one per line, naming the new name (default: the "
        "toy world's 8 subjects by NAME; else the distinct training captions)",
    )
    mimic.add_argument(
        "--judge",
        help="a transformers CLIP folder for the zero-shot judge (default: the toy CLIP on "
        "the toy world; required otherwise)",
    )
    mimic.add_argument(
        "--candidates",
        help="comma-separated artists / styles the judge chooses among (default: the "
        "Toy Atelier's artists on the toy world; required otherwise)",
    )
    mimic.add_argument(
        "--template",
        default="a painting by {artist}",
        help="the judge's caption per candidate (default: %(default)s; the toy world's judge uses "
        "every 'a painting of a {subject} by {artist}')",
    )
    mimic.add_argument(
        "--prior",
        help="imagefolder of prior-preservation images with captions (default: the toy "
        "world's trained artists; else class images the model generates)",
    )
    mimic.add_argument(
        "--held-out",
        help="folder of the artist's held-out works, for CLIP similarity (default: the "
        "Toy Atelier's test split of the artist on the toy world; else none)",
    )
    mimic.add_argument("--steps", type=int, default=120, help="fine-tuning steps (default: %(default)s)")
    mimic.add_argument("--lr", type=float, help="learning rate (default: 1e-3 full, 5e-3 lora)")
    mimic.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    mimic.add_argument(
        "--sampler",
        choices=("ddim", "lcm"),
        default="ddim",
        help="ddim: --sampling-steps steps at --guidance; lcm: the toy LCM-LoRA merged into the mimic, --lcm-steps "
        "steps at guidance 1 (toy world only; faster, but on cloaked images it can disagree with DDIM even where it "
        "agrees on clean ones: use --check-sampler) (default: %(default)s)",
    )
    mimic.add_argument("--lcm-steps", type=int, default=3, help="steps of the LCM sampler, 1-4 (default: %(default)s)")
    mimic.add_argument(
        "--check-sampler",
        action="store_true",
        help="when sampling otherwise than with 25-step DDIM (--sampler lcm, fewer --sampling-steps): also sample "
        "the same prompts and seeds with 25-step DDIM and record in results.json (sampler_check) whether the share "
        "attributed to the artist lies in its 95%% interval, and how many generations both attribute alike "
        "(default: off)",
    )
    mimic.add_argument(
        "--interval",
        type=float,
        help="sample in rounds of 8 per prompt until the protection rate's 95%% interval is within +- this share "
        "(e.g. 0.05), at most --samples per prompt (default: all --samples)",
    )
    mimic.add_argument(
        "--sampling-steps", type=int, default=25, help="DDIM steps per generation (default: %(default)s)"
    )
    mimic.add_argument(
        "--guidance", type=float, default=5.0, help="guidance scale of the generations (default: %(default)s)"
    )
    _common(mimic)
    mimic.set_defaults(func=_mimic)


def _mimic(args: argparse.Namespace) -> int:
    from .mimicry import MimicConfig, run

    sampler = args.sampler
    config = MimicConfig(
        sampler=sampler,
        lcm_steps=args.lcm_steps,
        method=args.method,
        steps=args.steps,
        lr=args.lr,
        rank=args.rank,
        seed=args.seed,
        samples_per_prompt=args.samples,
        num_inference_steps=args.sampling_steps,
        guidance_scale=args.guidance,
        interval_half_width=args.interval,
    )
    device = _device(args.device)
    results = run(
        args.model,
        args.images,
        args.name,
        args.out,
        config,
        artist=args.artist,
        adversaries=args.adversary,
        prompts_file=args.prompts,
        judge_folder=args.judge,
        candidates=args.candidates.split(",") if args.candidates else None,
        template=args.template,
        prior_folder=args.prior,
        held_out_folder=args.held_out,
        check_sampler="reference" if args.check_sampler else None,
        device=device,
        progress=not args.quiet,
        provenance=provenance(args, device),
    )
    low, high = results["protection_interval"]
    print(
        f"protection rate {100 * results['protection_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] "
        f"({results['protected']}/{results['generations']} generations not attributed to {results['artist']}); "
        f"attributed to: {', '.join(f'{k} {v}' for k, v in results['attributed_to'].items() if v)}"
    )
    check = results.get("sampler_check")
    if check:
        verdict = "agrees with" if check["agrees"] else "DISAGREES with"
        print(
            f"sampler check: the share attributed to {results['artist']} "
            f"{100 * check['distilled_attributed']['value']:.1f}% {verdict} 25-step DDIM's "
            f"{100 * check['reference_attributed']['value']:.1f}% "
            f"[{100 * check['reference_attributed']['low']:.1f}, {100 * check['reference_attributed']['high']:.1f}] "
            f"on the same {check['generations']} prompts and seeds; {100 * check['paired_agreement']:.0f}% "
            "attributed alike"
        )
    print(f"results: {args.out}/results.json")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto: cuda > mps > cpu (default: %(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")


def _device(name: str):
    from fixative.core.cli.options import resolve_device

    return resolve_device(name)


def provenance(args: argparse.Namespace, device) -> dict:
    """What every eval record carries: the command, versions, device, seed."""
    import platform

    import torch

    from fixative import __version__

    options = {k: v for k, v in vars(args).items() if k != "func"}
    return {
        "command": options,
        "fixative": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "seed": args.seed,
    }


def _print(result: dict) -> int:
    print(json.dumps(result, indent=1, default=str))
    return 0


def _distribution(args: argparse.Namespace) -> int:
    import torch

    from .features import default_cache, folder_features, make_extractor
    from .fid import fid, kid

    torch.manual_seed(args.seed)
    device = _device(args.device)
    extractor = make_extractor(args.features, args.inception_weights, device)
    cache = None if args.no_cache else (args.cache or default_cache())
    real, real_record = folder_features(args.real, extractor, cache, args.batch_size, progress=not args.quiet)
    fake, fake_record = folder_features(args.fake, extractor, cache, args.batch_size, progress=not args.quiet)
    result = {"metric": args.metric}
    if args.metric == "fid":
        result["value"] = fid(real, fake)
    else:
        scores = kid(real, fake, args.subsets, args.subset_size, args.seed)
        result.update(value=scores.mean, std=scores.std, subsets=scores.subsets, subset_size=scores.subset_size)
    result.update(
        real=real_record, fake=fake_record, features=extractor.provenance, provenance=provenance(args, device)
    )
    return _print(result)


def _clip_score(args: argparse.Namespace) -> int:
    from fixative.core.errors import FixativeError

    from .clip_score import CLIPScorer, read_prompts
    from .features import file_sha256, image_files, read_uint8

    device = _device(args.device)
    folder = args.clip
    if folder == "toy":
        from fixative.core.toy import clip_folder

        folder = clip_folder()
    files = image_files(args.images)
    prompts = read_prompts(args.prompts)
    if len(prompts) != len(files):
        raise FixativeError(
            f"{args.prompts} has {len(prompts)} prompts for {len(files)} images in {args.images}; "
            "give one prompt per image, in file-name order"
        )
    pairs = [(f, p, read_uint8(f)) for f, p in zip(files, prompts)]
    skipped = [f.name for f, _, image in pairs if image is None]
    pairs = [(f, p, image) for f, p, image in pairs if image is not None]
    if not pairs:
        raise FixativeError(f"none of the images in {args.images} could be read")
    scorer = CLIPScorer(folder, device)
    result = scorer([image for _, _, image in pairs], [p for _, p, _ in pairs], args.batch_size)
    return _print(
        {
            "metric": "clip-score",
            "value": result.value,
            "images": len(pairs),
            "skipped": skipped,
            "per_image": {f.name: s for (f, _, _), s in zip(pairs, result.per_image)},
            "prompts_sha256": file_sha256(args.prompts),
            "clip": scorer.provenance,
            "provenance": provenance(args, device),
        }
    )


def _paired(args: argparse.Namespace) -> int:
    from .similarity import compare_folders

    device = _device(args.device)
    options = {"device": device}
    if args.metric == "lpips":
        options.update(lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone, lpips_weights=args.lpips_weights)
    result = compare_folders(args.test, args.reference, args.metric, **options)
    result["provenance"] = {**result.pop("provenance"), **provenance(args, device)}
    return _print(result)
