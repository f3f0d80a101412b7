// Grounding drawn over the user's image: the server's `qwenvl` extension gives each image's original
// and resized size and the boxes / points of the answer in original-image pixels (docs/grounding.md).
// Boxes are positioned in percent of the image, so they follow it at any displayed size.

const COLOURS = ["#e6194b", "#2f9e44", "#1c7ed6", "#f08c00", "#9c36b5", "#0c8599"];

function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);
  return node;
}

const percent = (value, total) => `${(100 * value) / total}%`;
const pixels = (values) => values.map((v) => Math.round(v)).join(", ");

// A <figure> with the image, its boxes and a caption, or null when there is nothing to draw.
// imageUrls: the data URLs of the images the request sent, in prompt order.
export function renderGrounding(extension, imageUrls) {
  if (!extension || !Array.isArray(extension.boxes) || !extension.boxes.length) return null;
  const index = extension.boxes[0].image;
  const info = (extension.images || []).find((image) => image.index === index);
  const url = imageUrls[index];
  if (!info || !url) return null;
  const { width, height } = info.original;
  const figure = el("figure", "grounding");
  figure.dataset.testid = "grounding";
  const frame = el("div", "frame");
  const picture = el("img");
  picture.src = url;
  picture.alt = `image ${index + 1}`;
  frame.append(picture);
  const notes = el("ol", "box-list");
  extension.boxes.forEach((box, number) => {
    const colour = COLOURS[number % COLOURS.length];
    frame.append(box.kind === "point" ? pointMark(box, colour, width, height) : boxMark(box, colour, width, height));
    notes.append(note(box, colour));
  });
  const resized = info.resized;
  const caption = el(
    "figcaption",
    "",
    `Image ${index + 1}: ${width}×${height} px; the model saw it resized to ${resized.width}×${resized.height}. ` +
      `Coordinates below are in the original image's pixels.`,
    notes,
  );
  figure.append(frame, caption);
  return figure;
}

function boxMark(box, colour, width, height) {
  const [x1, y1, x2, y2] = box.box;
  const mark = el("div", box.outside ? "box outside" : "box");
  mark.dataset.testid = "box";
  Object.assign(mark.style, {
    left: percent(x1, width),
    top: percent(y1, height),
    width: percent(x2 - x1, width),
    height: percent(y2 - y1, height),
    borderColor: colour,
  });
  if (box.label) mark.append(label(box.label, colour, y1 < height * 0.06));
  return mark;
}

function pointMark(box, colour, width, height) {
  const [x, y] = box.point;
  const mark = el("div", "point");
  mark.dataset.testid = "box";
  Object.assign(mark.style, { left: percent(x, width), top: percent(y, height), borderColor: colour });
  if (box.label) mark.append(label(box.label, colour, false));
  return mark;
}

function label(text, colour, inside) {
  const node = el("span", inside ? "box-label inside" : "box-label", text);
  node.dataset.testid = "box-label";
  node.style.background = colour;
  return node;
}

function note(box, colour) {
  const swatch = el("span", "swatch");
  swatch.style.background = colour;
  const where = box.kind === "point" ? `point (${pixels(box.point)})` : `box (${pixels(box.box)})`;
  const flags = box.outside ? " — wholly outside the image" : box.clamped ? " — clamped to the image edge" : "";
  const raw = `model wrote [${box.raw.join(", ")}] (${box.convention.replace("_", " ")})`;
  return el("li", "", swatch, `${box.label || "(no label)"}: ${where}${flags}; ${raw}`);
}
