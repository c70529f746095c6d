"""Detection and segmentation runs (`vision:` with `task: detect` or
`task: segment`): a keras-hub RetinaNet or DeepLabV3+ on `model.preset`'s
encoder, built by `kft.vision`."""

from kft.recipes import vision as recipe_vision
from kft.recipes.tasks.base import Task

__all__ = ["ObjectDetection", "SemanticSegmentation", "VisionTask"]


class VisionTask(Task):
    """What detection and segmentation share: the model comes first (its
    classes are known from the recipe), then the data (so that a stage
    callback can read the validation set)."""

    kind = ""

    def matches(self, config):
        vision = getattr(config, "vision", None)
        return vision is not None and vision.task == self.kind

    def input_shape(self, config):
        return (*recipe_vision.image_size(config), 3)

    def build_data(self, config, input_shape, smoke):
        return None  # built in setup_after_model

    def build_model(self, config, bundle, input_shape, load_weights):
        return recipe_vision.vision_model(config, load_weights)

    def setup_after_model(self, run):
        run.bundle = recipe_vision.vision_data(run.config, smoke=run.smoke)
        run.data_ready()
        callbacks = self.stage_callbacks(run)
        if callbacks:
            # Python objects in the stages, after the resolved recipe (and
            # its hash) was written: config.yaml and resume see none.
            run.config = run.config.model_copy(update={"stages": [
                stage.model_copy(update={"callbacks": [*stage.callbacks,
                                                       *callbacks]})
                for stage in run.config.stages]})

    def stage_callbacks(self, run):
        """Callbacks every stage gets (before kft's own)."""
        return []

    def finalize(self, run):
        metrics = super().finalize(run)
        data = run.bundle.val if run.bundle.val is not None else run.bundle.train
        recipe_vision.plot_predictions(
            run.model, data, run.config.vision.task,
            run.path("plots", "predictions.png"))
        return metrics

    def load_run(self, run_dir, config):
        import kft.vision  # noqa: F401  (registers Detector and Segmenter)

        return super().load_run(run_dir, config)

    def evaluate_run(self, run_dir, config, model, data_path=None):
        if data_path:
            return super().evaluate_run(run_dir, config, model, data_path)
        bundle = recipe_vision.vision_data(config)
        model.compile()
        data = bundle.val if bundle.val is not None else bundle.train
        return self.evaluate(model, data, bundle.class_names, run_dir,
                             prefix="eval_")


class ObjectDetection(VisionTask):
    """Boxes: COCO mAP (pycocotools) per epoch in `history.csv` and at the
    end in `metrics.json`."""

    name = "object_detection"
    kind = "detect"

    def stage_callbacks(self, run):
        from kft.vision.metrics import DetectionMetrics

        if run.bundle.val is None:
            return []
        return [DetectionMetrics(run.bundle.val, len(run.bundle.class_names),
                                 every=run.config.vision.map_every)]

    def evaluate(self, model, data, class_names, output_dir, prefix=""):
        from kft.vision.metrics import coco_map
        from kft.vision.metrics import predict_detections

        result = super().evaluate(model, data, class_names, output_dir, prefix)
        truth, found = predict_detections(model, data)
        scores = coco_map(truth, found, len(class_names))
        return {**result, "map": scores["map"], "map50": scores["map50"],
                "map75": scores["map75"]}


class SemanticSegmentation(VisionTask):
    """Masks: pixel accuracy and mean IoU (`keras.metrics.MeanIoU`)."""

    name = "semantic_segmentation"
    kind = "segment"
