# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "subaddress"];
if address :user :is "to" "bob" {
  fileinto "yes";
} else {
  fileinto "no";
}
