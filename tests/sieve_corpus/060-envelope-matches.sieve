# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "envelope"];
if envelope :matches "from" "*@example.*" {
  fileinto "yes";
} else {
  fileinto "no";
}
