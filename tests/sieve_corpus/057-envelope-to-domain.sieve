# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "envelope"];
if envelope :domain :is "to" "example.com" {
  fileinto "yes";
} else {
  fileinto "no";
}
