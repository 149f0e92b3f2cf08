from jfcnn.models.fpn import FPN as FPN
from jfcnn.models.layers import FrozenBatchNorm as FrozenBatchNorm
from jfcnn.models.resnet import BasicBlock as BasicBlock
from jfcnn.models.resnet import Bottleneck as Bottleneck
from jfcnn.models.resnet import ResNet as ResNet
from jfcnn.models.resnet import ResNetStage as ResNetStage
from jfcnn.models.unet import UNet as UNet
