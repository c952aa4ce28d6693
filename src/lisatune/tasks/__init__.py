"""lm-evaluation-harness tasks shipped with lisatune (YAML here, their documents from gsm.py); no download.

    lisatune eval runs/x/final --tasks lisatune_gsm,lisatune_gsm_mc
    lm_eval --model hf --model_args pretrained=runs/x/final --include_path <this folder> --tasks lisatune_gsm
"""
