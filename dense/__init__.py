"""The paper's dense half, Tables 3-4: MPVG backbones for COCO detection and ADE20K segmentation."""
