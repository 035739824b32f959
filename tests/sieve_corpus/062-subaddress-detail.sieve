# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "envelope", "subaddress"];
if envelope :detail :is "to" "lists" {
  fileinto "yes";
} else {
  fileinto "no";
}
