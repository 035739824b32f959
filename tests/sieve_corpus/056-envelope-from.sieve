# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "envelope"];
if envelope :is "from" "alice@example.org" {
  fileinto "yes";
} else {
  fileinto "no";
}
